"""Pictures of diffusion (matplotlib, Agg, no pyplot): the forward process and the schedules, the
reverse trajectory, the bound per timestep, latent interpolation and the 2-D playground.

Every picture is two steps: a function computing the data (tensors / arrays, returned so tests
and callbacks can check or log them) and a ``*_figure`` function drawing a matplotlib ``Figure``
from it. ``src/visualize.py`` (:mod:`ddpm.tasks.visualize`) wires them to checkpoints and data.
"""

from ddpm.viz.forward import (
    forward_diffusion,
    forward_figure,
    forward_timesteps,
    make_diffusions,
    schedule_curves,
    schedule_figure,
)
from ddpm.viz.interpolate import interpolate, interpolation_figure, slerp
from ddpm.viz.loss import loss_by_t_figure, loss_by_timestep
from ddpm.viz.playground import playground_figures, playground_report, score_field
from ddpm.viz.plots import new_figure, save_figure
from ddpm.viz.reverse import reverse_figure, reverse_trajectory, sampler_label

__all__ = [
    "forward_diffusion",
    "forward_figure",
    "forward_timesteps",
    "interpolate",
    "interpolation_figure",
    "loss_by_t_figure",
    "loss_by_timestep",
    "make_diffusions",
    "new_figure",
    "playground_figures",
    "playground_report",
    "reverse_figure",
    "reverse_trajectory",
    "sampler_label",
    "save_figure",
    "schedule_curves",
    "schedule_figure",
    "score_field",
    "slerp",
]
