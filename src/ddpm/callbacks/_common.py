"""Helpers shared by the evaluation callbacks: cadence, logging outside Lightning's log cadence,
image logging, data shapes, and the base of the picture callbacks (:class:`PictureCallback`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ddpm.callbacks.preemption import preemption_requested
from ddpm.contracts import Denormalizes, HasValidationData, KnowsSampleShape, optional
from ddpm.utils.checks import check_positive_int

log = logging.getLogger(__name__)


def default_sampler() -> Callable[..., Any]:
    """DDIM with 50 steps (η = 0), used when no sampler is configured."""
    from ddpm.diffusion.samplers import DDIMSampler

    return DDIMSampler(steps=50)


def is_fast_dev_run(trainer: pl.Trainer) -> bool:
    return bool(getattr(trainer, "fast_dev_run", False))


def log_metrics_now(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger at the current step (rank 0) and expose them in
    ``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor=...)`` and the task's metrics
    see them). Unlike ``self.log`` this is not gated by ``log_every_n_steps`` and works in any
    hook (also ``on_train_end``)."""
    tensors = {k: torch.tensor(float(v)) for k, v in metrics.items()}
    trainer.callback_metrics.update(tensors)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)


def log_image(trainer: pl.Trainer, key: str, image: Tensor | None, path: Path) -> None:
    """Log an image (uint8 (3, H, W), or only a PNG file) to the active loggers (rank 0).

    W&B: ``WandbLogger.log_image``; TensorBoard: ``experiment.add_image``; others (CSV, none):
    nothing, the PNG file is the record.
    """
    if not trainer.is_global_zero:
        return
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    step = trainer.global_step
    for logger in trainer.loggers:
        try:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)], step=step)
            elif isinstance(logger, TensorBoardLogger):
                img = image
                if img is None:
                    from ddpm.utils.images import read_png

                    img = torch.from_numpy(read_png(path).copy()).permute(2, 0, 1)
                logger.experiment.add_image(key, img, global_step=step)
        except Exception as e:  # a logger hiccup must never stop training
            log.warning(
                "could not log %s to %s: %s: %s", key, type(logger).__name__, type(e).__name__, e
            )


def log_figure(trainer: pl.Trainer, fig: Any, path: Path, key: str) -> Path:
    """Save the matplotlib figure ``fig`` as ``path`` (``ddpm.viz.plots.save_figure``), close it
    and log the PNG under ``key`` (:func:`log_image`)."""
    import matplotlib.pyplot as plt

    from ddpm.viz.plots import save_figure

    path = save_figure(fig, path)
    plt.close(fig)
    log_image(trainer, key, None, path)
    return path


def sample_shape_of(
    trainer: pl.Trainer, explicit: Sequence[int] | None, seen: tuple[int, ...] | None
) -> tuple[int, ...]:
    """Shape of one sample: ``explicit``, else the datamodule's (:class:`KnowsSampleShape`), else
    the first training batch's."""
    if explicit is not None:
        return tuple(int(s) for s in explicit)
    dm = optional(getattr(trainer, "datamodule", None), KnowsSampleShape)
    if dm is not None and dm.sample_shape is not None:
        return tuple(int(s) for s in dm.sample_shape)
    if seen is not None:
        return seen
    raise ValueError(
        "cannot tell the sample shape: give sample_shape=[C, H, W] (or [D]) or use "
        "a datamodule with a `sample_shape` property (ddpm.contracts.KnowsSampleShape)"
    )


def batch_sample_shape(batch: Any) -> tuple[int, ...] | None:
    x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    return tuple(x.shape[1:]) if isinstance(x, Tensor) and x.ndim >= 2 else None


def first_samples(loader: Any, n: int) -> Tensor | None:
    """The first ``n`` samples of ``loader`` (float32, CPU; fewer if it runs out), reading only
    the batches needed; None for an empty loader."""
    return first_labelled_samples(loader, n)[0]


def first_labelled_samples(loader: Any, n: int) -> tuple[Tensor | None, Tensor | None]:
    """:func:`first_samples` and their class labels (None unless the batches are
    ``(x, labels)``, as with ``data.conditional=true``)."""
    got: list[Tensor] = []
    labels: list[Tensor] = []
    have = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        got.append(x.detach().float().cpu())
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            labels.append(torch.as_tensor(batch[1]).detach().cpu())
        have += x.shape[0]
        if have >= n:
            break
    if not got:
        return None, None
    y = torch.cat(labels)[:n] if len(labels) == len(got) else None
    return torch.cat(got)[:n], y


def validation_samples(trainer: pl.Trainer, n: int) -> Tensor | None:
    """The first ``n`` validation samples of the trainer's datamodule (:func:`first_samples`);
    None without a datamodule that has validation data."""
    dm = optional(getattr(trainer, "datamodule", None), HasValidationData)
    return None if dm is None else first_samples(dm.val_dataloader(), n)


def denormalizer(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    """``datamodule.denormalize`` (model space -> [0, 1]; :class:`Denormalizes`) when there is
    one."""
    dm = optional(getattr(trainer, "datamodule", None), Denormalizes)
    return None if dm is None else dm.denormalize


class StepCadence:
    """Fires once per optimizer step ``s`` with ``s % every_n_steps == 0`` (robust to gradient
    accumulation, where ``on_train_batch_end`` runs several times per step)."""

    def __init__(self, every_n_steps: int | None) -> None:
        self.every_n_steps = every_n_steps
        self.last_step = -1

    def due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step == self.last_step:
            return False
        return step % self.every_n_steps == 0

    def mark(self, trainer: pl.Trainer) -> None:
        self.last_step = trainer.global_step


class PeriodicCallback(pl.Callback):
    """Calls ``self.run(trainer, pl_module)`` every ``every_n_steps`` optimizer steps (None or 0:
    never during training) and, with ``at_train_end``, once more when training ends (unless it
    just ran at that step). Subclasses call ``super().__init__(every_n_steps, at_train_end)``
    and implement ``run``; ``_seen_shape`` is the shape of one training sample, recorded from
    the first batch."""

    def __init__(self, every_n_steps: int | None, at_train_end: bool) -> None:
        super().__init__()
        check_positive_int("every_n_steps", every_n_steps or 1)
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.at_train_end = bool(at_train_end)
        self._cadence = StepCadence(self.every_n_steps)
        self._seen_shape: tuple[int, ...] | None = None

    def _check_initialized(self) -> None:
        if "_cadence" not in vars(self):
            raise TypeError(
                f"{type(self).__name__}.__init__ must call "
                "super().__init__(every_n_steps, at_train_end) (PeriodicCallback)"
            )

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._check_initialized()
        if self._seen_shape is None:
            self._seen_shape = batch_sample_shape(batch)
        if self._cadence.due(trainer):
            self._cadence.mark(trainer)
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_initialized()
        if self.at_train_end and trainer.global_step != self._cadence.last_step:
            self._cadence.mark(trainer)
            self.run(trainer, pl_module)


class PictureCallback(PeriodicCallback):
    """A :class:`PeriodicCallback` that draws pictures on rank 0: the part every picture callback
    shares (sample grid, forward process, loss by t, playground).

    ``run`` skips non-zero ranks (no collective inside: under DDP the others wait for rank 0 at
    the next gradient all-reduce), ``fast_dev_run`` and a pending stop signal; it puts the network
    (the EMA one with ``use_ema``, ``pl_module.denoiser``) in eval mode, calls
    ``draw(trainer, pl_module, model, shape, out_dir)`` (what a subclass implements; it returns
    the PNGs it wrote, logged with :func:`log_image`), restores the mode and records the files in
    ``saved``. PNGs go to ``output_dir`` (default ``<trainer.default_root_dir>/samples``). The
    end-of-training picture is skipped when the run stops on a signal, or ends before the first
    picture (``global_step < every_n_steps``: an untrained model's pictures say nothing, and
    drawing them can take longer than the run).
    """

    picture = "picture"  # what the log messages call it
    hint = ""  # appended to the "no end-of-training picture" message
    skip_log_level = logging.DEBUG  # of that message

    def __init__(
        self,
        every_n_steps: int | None,
        at_train_end: bool,
        *,
        num_samples: int,
        output_dir: str | None = None,
        use_ema: bool = True,
        seed: int = 0,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(every_n_steps, at_train_end)
        self.num_samples = check_positive_int("num_samples", num_samples)  # what a picture shows
        self.output_dir = output_dir
        self.use_ema = bool(use_ema)
        self.seed = int(seed)
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.saved: list[Path] = []  # every PNG written (rank 0)

    @property
    def _logger(self) -> logging.Logger:
        """The subclass's module logger (``ddpm.callbacks.sample_grid``, ...)."""
        return logging.getLogger(type(self).__module__)

    def out_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "samples")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_train_end or is_fast_dev_run(trainer):
            return
        name = type(self).__name__
        if preemption_requested(trainer):
            self._logger.info("%s: stopping on a signal, no end-of-training %s", name, self.picture)
            return
        step = trainer.global_step
        if self.every_n_steps and step < self.every_n_steps:
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
        model = pl_module.denoiser(use_ema=self.use_ema)
        shape = sample_shape_of(trainer, self.sample_shape, self._seen_shape)
        was_training = model.training
        model.eval()
        written: list[Path] = []
        try:
            written = self.draw(trainer, pl_module, model, shape, self.out_dir(trainer))
        finally:
            model.train(was_training)
            self.saved.extend(written)
        return written

    def draw(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: Any,
        shape: tuple[int, ...],
        out_dir: Path,
    ) -> list[Path]:
        """Draw, save and log the pictures of ``model`` (in eval mode) for samples of ``shape``;
        return the PNGs written (rank 0)."""
        raise NotImplementedError
