"""The bound by timestep while training, as ``visualize.py what=loss_by_t`` draws it: the terms
L_0, L_t, L_T (Ho et al. 2020, eq. 5) and the MSE per timestep on the first validation images, at
every cadence step (``loss_by_t_step_0001000.png``, logged as ``samples/loss_by_t``; T network
calls per batch). Image data only (other data: nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ddpm.callbacks.inputs import validation_samples
from ddpm.callbacks.picture import PictureCallback, log_figure
from ddpm.utils.devices import model_device
from ddpm.viz.loss import loss_by_t_figure, loss_by_timestep


class LossByTPicture(PictureCallback):
    """Plot the bound's terms per timestep averaged over ``num_samples`` (default 16) validation
    images every ``every_n_steps`` steps (T network calls per batch: keep it small), with noise
    seeded by ``seed``. Arguments: :class:`~ddpm.callbacks.picture.PictureCallback`'s (the config
    follows the sample grid's cadence)."""

    picture = "loss-by-t picture"
    default_num_samples = 16

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: Any) -> list[Path]:
        if len(self.shape(trainer)) != 3:
            return []
        x0 = validation_samples(trainer, self.num_samples)
        if x0 is None:
            return []
        device = model_device(net, pl_module.device)
        step = trainer.global_step
        result = loss_by_timestep(
            net,
            pl_module.diffusion,
            x0.to(device),
            generator=torch.Generator(device=device).manual_seed(self.seed),
        )
        fig = loss_by_t_figure(result, title=f"step {step}")
        path = self.out_dir(trainer) / f"loss_by_t_step_{step:07d}.png"
        return [log_figure(trainer, fig, path, "samples/loss_by_t")]
