"""The straightness of the learned probability-flow ODE's paths while training (Liu et al. 2023,
eq. 8; :func:`ddpm.diffusion.reflow.straightness`), logged as ``val/straightness``: at the first
step (a reflow run: the teacher's), every ``every_n_steps`` steps and at the end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl

from ddpm.callbacks.inputs import sample_shape_of
from ddpm.callbacks.periodic import PeriodicCallback, eval_net, is_fast_dev_run, log_metrics_now
from ddpm.diffusion.reflow import mean_straightness
from ddpm.utils.checks import check_positive_int

METRIC = "val/straightness"


class Straightness(PeriodicCallback):
    """E[S] over ``num_samples`` paths of ``sampler`` (a deterministic one) from noise seeded by
    ``seed`` (the same paths every time; a class-conditional network's for labels seeded alike,
    :func:`~ddpm.diffusion.reflow.seeded_chunk`), with the EMA network when ``use_ema``.

    Args:
        sampler: the sampler whose paths are measured (e.g. Euler with 100 steps).
        num_samples, batch_size, seed: how many paths, how many per call, their noise's seed.
        every_n_steps, at_train_end: :class:`~ddpm.callbacks.periodic.PeriodicCallback`'s.
        at_train_start: also when training starts (before the first step).
        sample_shape: shape of one sample (default: the datamodule's).
    """

    def __init__(
        self,
        sampler: Callable[..., Any],
        num_samples: int = 1000,
        batch_size: int = 1000,
        seed: int = 0,
        every_n_steps: int | None = None,
        at_train_start: bool = True,
        at_train_end: bool = True,
        use_ema: bool = True,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(every_n_steps, at_train_end)
        self.sampler = sampler
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed, self.use_ema = int(seed), bool(use_ema)
        self.at_train_start = bool(at_train_start)
        self.sample_shape = sample_shape

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_start and not is_fast_dev_run(trainer):
            self._cadence.mark(trainer)
            self.run(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        shape = sample_shape_of(trainer, self.sample_shape, self._seen_shape)
        with eval_net(pl_module, self.use_ema) as net:
            s = mean_straightness(
                net,
                pl_module.diffusion,
                self.sampler,
                shape,
                self.num_samples,
                self.seed,
                self.batch_size,
            )
        log_metrics_now(trainer, {METRIC: s})
        return s
