"""The forward process while training, as ``visualize.py what=forward`` draws it: q(x_t | x_0)
(Ho et al. 2020, eq. 4) of the first validation images under the run's schedule, drawn once
(``forward.png``, logged as ``samples/forward``). Image data only (other data: nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ddpm.callbacks.inputs import denormalizer, validation_samples
from ddpm.callbacks.picture import PictureCallback, log_figure
from ddpm.viz.forward import forward_diffusion, forward_figure, forward_timesteps


class ForwardProcessPicture(PictureCallback):
    """Draw the forward process of ``num_samples`` (default 8) validation images (rows) once, at
    the first cadence step (or at the end of training with ``every_n_steps`` None / 0), with noise
    seeded by ``seed``. Arguments: :class:`~ddpm.callbacks.picture.PictureCallback`'s (the config
    follows the sample grid's cadence)."""

    picture = "forward-process picture"
    default_num_samples = 8

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: Any) -> list[Path]:
        # drawn once; the picture counts DDPM's forward steps (a continuous process: not drawn)
        if self.saved or len(self.shape(trainer)) != 3 or not pl_module.diffusion.discrete:
            return []
        x0 = validation_samples(trainer, self.num_samples)
        if x0 is None:
            return []
        diffusion = pl_module.diffusion
        label = str(getattr(diffusion, "schedule", "schedule"))
        result = forward_diffusion(
            x0,
            {label: diffusion},
            forward_timesteps(diffusion.num_timesteps),
            generator=torch.Generator().manual_seed(self.seed),
        )
        fig = forward_figure(result, denormalize=denormalizer(trainer))
        path = self.out_dir(trainer) / "forward.png"
        return [log_figure(trainer, fig, path, "samples/forward")]
