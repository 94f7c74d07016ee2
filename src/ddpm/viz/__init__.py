"""Pictures of diffusion (matplotlib, Agg, no pyplot): the forward process and the schedules, the
reverse trajectory, the bound per timestep, latent interpolation, classifier-free guidance and the
2-D playground.

Every picture is two steps: a function computing the data (tensors / arrays, returned so tests
and callbacks can check or log them) and a ``*_figure`` function drawing a matplotlib ``Figure``
from it. ``src/visualize.py`` (:mod:`ddpm.tasks.visualize`) wires them to checkpoints and data,
the picture callbacks (:mod:`ddpm.callbacks`) to a training run.
"""

from ddpm.viz.forward import (
    forward_diffusion,
    forward_figure,
    forward_timesteps,
    make_diffusions,
    schedule_curves,
    schedule_figure,
)
from ddpm.viz.guidance import guidance_figure, guidance_sweep
from ddpm.viz.interpolate import interpolate, interpolation_figure, slerp
from ddpm.viz.loss import loss_by_t_figure, loss_by_timestep
from ddpm.viz.playground import playground_figures, playground_report, score_field
from ddpm.viz.plots import new_figure, save_figure, scatter_figure
from ddpm.viz.reverse import denoising_trajectory, reverse_figure, sampler_label, strip_timesteps

__all__ = [
    "denoising_trajectory",
    "forward_diffusion",
    "forward_figure",
    "forward_timesteps",
    "guidance_figure",
    "guidance_sweep",
    "interpolate",
    "interpolation_figure",
    "loss_by_t_figure",
    "loss_by_timestep",
    "make_diffusions",
    "new_figure",
    "playground_figures",
    "playground_report",
    "reverse_figure",
    "sampler_label",
    "save_figure",
    "scatter_figure",
    "schedule_curves",
    "schedule_figure",
    "score_field",
    "slerp",
    "strip_timesteps",
]
