"""The base of the picture callbacks (:class:`PictureCallback`: sample grid, forward process, loss
by t, playground) and the logging of their PNGs to W&B / TensorBoard."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from ddpm.callbacks.inputs import sample_shape_of
from ddpm.callbacks.periodic import PeriodicCallback, eval_net, is_fast_dev_run
from ddpm.callbacks.preemption import preemption_requested
from ddpm.utils.checks import check_positive_int
from ddpm.utils.images import read_png
from ddpm.viz.plots import save_figure

log = logging.getLogger(__name__)


def log_image(trainer: pl.Trainer, key: str, image: Tensor | None, path: Path) -> None:
    """Log an image (uint8 (3, H, W), or only a PNG file) to the active loggers (rank 0).

    W&B: ``WandbLogger.log_image``; TensorBoard: ``experiment.add_image``; others (CSV, none):
    nothing, the PNG file is the record.
    """
    if not trainer.is_global_zero:
        return
    step = trainer.global_step
    for logger in trainer.loggers:
        try:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)], step=step)
            elif isinstance(logger, TensorBoardLogger):
                img = image
                if img is None:
                    img = torch.from_numpy(read_png(path).copy()).permute(2, 0, 1)
                logger.experiment.add_image(key, img, global_step=step)
        except Exception as e:  # a logger hiccup must never stop training
            log.warning(
                "could not log %s to %s: %s: %s", key, type(logger).__name__, type(e).__name__, e
            )


def log_figure(trainer: pl.Trainer, fig: Any, path: Path, key: str) -> Path:
    """Save the matplotlib figure ``fig`` as ``path`` (:func:`ddpm.viz.plots.save_figure`) and
    log the PNG under ``key`` (:func:`log_image`)."""
    path = save_figure(fig, path)
    log_image(trainer, key, None, path)
    return path


class PictureCallback(PeriodicCallback):
    """A :class:`PeriodicCallback` that draws pictures on rank 0: the part every picture callback
    shares.

    ``run`` skips non-zero ranks (no collective inside: under DDP the others wait for rank 0 at
    the next gradient all-reduce), ``fast_dev_run`` and a pending stop signal; it puts the network
    (the EMA one with ``use_ema``) in eval mode, calls ``draw(trainer, pl_module, net)`` (what a
    subclass implements; it returns the PNGs it wrote, logged with :func:`log_image` /
    :func:`log_figure`), restores the mode and records the files in ``saved``. PNGs go to
    :meth:`out_dir`; :meth:`shape` is the shape of one sample. The end-of-training picture is
    skipped when the run stops on a signal, or (unless ``skips_before_first`` is off) ends before the first picture
    (``global_step < every_n_steps``: an untrained model's pictures say little, and drawing them
    can take longer than the run).

    Args:
        every_n_steps: cadence in optimizer steps (None or 0: only at the end of training).
        at_train_end: also draw when training ends (if not just done at that step).
        num_samples: what a picture shows (images, validation samples, points); None: the
            picture's ``default_num_samples``.
        seed: seed of the picture's noise / samples.
        use_ema: draw with the EMA network when an EMA callback runs.
        output_dir: where the PNGs go (default ``<trainer.default_root_dir>/samples``).
        sample_shape: shape of one sample; default ``datamodule.sample_shape``.
    """

    picture = "picture"  # what the log messages call it
    hint = ""  # appended to the "no end-of-training picture" message
    skip_log_level = logging.DEBUG  # of that message
    skips_before_first = True  # no end-of-training picture in a run that ended before the first
    default_num_samples = 64

    def __init__(
        self,
        every_n_steps: int | None = 500,
        at_train_end: bool = True,
        num_samples: int | None = None,
        seed: int = 0,
        use_ema: bool = True,
        output_dir: str | None = None,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(every_n_steps, at_train_end)
        n = self.default_num_samples if num_samples is None else num_samples
        self.num_samples = check_positive_int("num_samples", n)
        self.seed = int(seed)
        self.use_ema = bool(use_ema)
        self.output_dir = output_dir
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.saved: list[Path] = []  # every PNG written (rank 0)

    @property
    def _logger(self) -> logging.Logger:
        """The subclass's module logger (``ddpm.callbacks.sample_grid``, ...)."""
        return logging.getLogger(type(self).__module__)

    def out_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "samples")

    def shape(self, trainer: pl.Trainer) -> tuple[int, ...]:
        """Shape of one sample: ``sample_shape``, else the datamodule's, else the first batch's."""
        return sample_shape_of(trainer, self.sample_shape, self._seen_shape)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_train_end or is_fast_dev_run(trainer):
            return
        name = type(self).__name__
        if preemption_requested(trainer):
            self._logger.info("%s: stopping on a signal, no end-of-training %s", name, self.picture)
            return
        step = trainer.global_step
        if self.skips_before_first and self.every_n_steps and step < self.every_n_steps:
            if trainer.is_global_zero:
                self._logger.log(
                    self.skip_log_level,
                    "%s: the run ended at step %d, before its first %s (every %d steps): no "
                    "end-of-training %s%s",
                    name,
                    step,
                    self.picture,
                    self.every_n_steps,
                    self.picture,
                    self.hint,
                )
            return
        super().on_train_end(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Path]:
        """Draw, save and log the pictures now (rank 0 only; others return [])."""
        if not trainer.is_global_zero:
            return []
        if is_fast_dev_run(trainer):
            self._logger.info("%s: skipped under fast_dev_run", type(self).__name__)
            return []
        if preemption_requested(trainer):
            return []
        with eval_net(pl_module, self.use_ema) as net:
            written = self.draw(trainer, pl_module, net)
        self.saved.extend(written)
        return written

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: Any) -> list[Path]:
        """Draw, save and log the pictures of ``net`` (in eval mode); return the PNGs written
        (rank 0)."""
        raise NotImplementedError
