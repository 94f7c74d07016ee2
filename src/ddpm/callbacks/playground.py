"""The 2-D playground while training (``visualize.py what=playground`` from a checkpoint): the
score field and the reverse trajectory of the samples (``score_step_0001000.png``,
``reverse_step_0001000.png``, logged as ``samples/score`` / ``samples/reverse``), and the energy
distance (Székely & Rizzo 2013) and MMD (Gretton et al. 2012) of the samples to validation
points, logged as ``val/energy_distance`` / ``val/mmd``. Other data: nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ddpm.callbacks.inputs import default_sampler, validation_samples
from ddpm.callbacks.periodic import log_metrics_now
from ddpm.callbacks.picture import PictureCallback, log_figure
from ddpm.utils.classes import num_classes_of
from ddpm.utils.devices import model_device
from ddpm.viz.playground import playground_figures, playground_report


class Playground(PictureCallback):
    """Draw the playground and log the distances every ``every_n_steps`` steps (2-D data).

    Args:
        sampler: the sampler (the Hydra ``sampler`` node). Default: DDIM, 50 steps. A
            class-conditional network is compared unguided (``guidance_scale`` 1): the reference
            is all validation points.
        num_samples: validation points, and samples drawn (seeded with ``seed``).
        every_n_steps, at_train_end, seed, use_ema, output_dir:
            :class:`~ddpm.callbacks.picture.PictureCallback`'s (the config follows the sample
            grid's cadence).
    """

    picture = "playground"

    def __init__(
        self,
        sampler: Callable[..., Any] | None = None,
        every_n_steps: int | None = 500,
        at_train_end: bool = True,
        num_samples: int = 64,
        seed: int = 0,
        use_ema: bool = True,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(every_n_steps, at_train_end, num_samples, seed, use_ema, output_dir)
        self.sampler = sampler if sampler is not None else default_sampler()

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: Any) -> list[Path]:
        if self.shape(trainer) != (2,):
            return []
        ref = validation_samples(trainer, self.num_samples)
        if ref is None:
            return []
        sampler = self.sampler
        guided = getattr(sampler, "guidance_scale", 1.0) != 1.0
        if num_classes_of(net) is not None and guided and dataclasses.is_dataclass(sampler):
            sampler = dataclasses.replace(sampler, guidance_scale=1.0)
        device = model_device(net, pl_module.device)
        report = playground_report(
            net, pl_module.diffusion, ref, {"sampler": sampler}, seed=self.seed, device=device
        )
        d = report["distances"]["sampler"]
        log_metrics_now(trainer, {"val/energy_distance": d["energy_distance"], "val/mmd": d["mmd"]})
        figs = playground_figures(report)
        step, out = trainer.global_step, self.out_dir(trainer)
        return [
            log_figure(trainer, figs[name], out / f"{name}_step_{step:07d}.png", f"samples/{name}")
            for name in ("score", "reverse")
        ]
