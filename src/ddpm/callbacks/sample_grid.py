"""Sample grids from fixed seeds while training, plus a denoising strip (x_t and x̂₀ over time).

Every ``every_n_steps`` optimizer steps rank 0 draws ``num_samples`` samples with the configured
sampler and the EMA weights (``pl_module.denoiser(use_ema=True)``), sample i from seed
``seed + i`` (:class:`~ddpm.utils.seeding.PerSampleGenerator`), so the same seeds give the same
grid whatever ``batch_size`` or the number of devices. The grid is saved as
``<output_dir>/step_0001000.png`` and the strip as ``<output_dir>/denoise_step_0001000.png``, and
both are logged to W&B / TensorBoard when those loggers are active. 2-D toy data gives scatter
plots instead of image grids. (The other pictures of a run have callbacks of their own:
``ddpm.callbacks.pictures`` (forward process, loss by t) and ``ddpm.callbacks.playground``.) A class-conditional network gets one row per class (row k drawn
for class k, with the sampler's ``guidance_scale``; ``ddpm.utils.classes.class_rows``), and the
strip's row j is drawn for class j. Other ranks skip (no collective inside), so under DDP they
simply wait for rank 0 at the next gradient all-reduce.

Sampling is announced in the log with a line per batch (and the sampler's progress bar on a
terminal); between batches it stops when a stop signal arrived (the checkpoint is written all the
same). A run that ends before its first grid (``global_step < every_n_steps``, e.g. a smoke test)
draws no end-of-training grid: an untrained model's samples are noise, and drawing them can take
longer than the run (64 images x 50 steps through a 64x64 U-Net on a CPU).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ddpm.callbacks._common import (
    PictureCallback,
    default_sampler,
    denormalizer,
    log_image,
)
from ddpm.callbacks.preemption import preemption_requested
from ddpm.diffusion.samplers.seeded import sample_batches
from ddpm.utils.checks import check_positive_int
from ddpm.utils.classes import balanced_labels, class_rows, num_classes_of
from ddpm.utils.devices import model_device
from ddpm.utils.images import (
    denoising_trajectory,
    save_denoising_strip,
    save_grid,
    save_scatter,
)

log = logging.getLogger(__name__)


@torch.inference_mode()
def sample_with_seeds(
    sampler: Callable[..., Any],
    model: Callable[[Tensor, Tensor], Tensor],
    diffusion: Any,
    sample_shape: Sequence[int],
    seeds: Sequence[int],
    batch_size: int,
    device: torch.device | str | None = None,
    stop: Callable[[], bool] | None = None,
    announce: Callable[[int, int], None] | None = None,
    class_labels: Tensor | None = None,
    **sampler_kwargs: Any,
) -> Tensor | None:
    """Samples for ``seeds`` (one per sample; ``class_labels`` one per sample for a conditional
    network), drawn ``batch_size`` at a time; CPU float32.

    Before each batch ``stop()`` is asked (None is returned when it says so) and after each
    ``announce(batches_done, batches)`` is called; ``sampler_kwargs`` go to the sampler. The
    batches: :func:`~ddpm.diffusion.samplers.sample_batches`."""
    seeds = list(seeds)
    n = -(-len(seeds) // batch_size)
    batches = sample_batches(
        sampler,
        model,
        diffusion,
        sample_shape,
        seeds,
        batch_size,
        device,
        class_labels,
        **sampler_kwargs,
    )
    out = []
    for i in range(n):
        if stop is not None and stop():
            return None
        out.append(next(batches).detach().float().cpu())
        if announce is not None:
            announce(i + 1, n)
    return torch.cat(out) if out else torch.empty(0, *sample_shape)


def _describe(sampler: Any) -> str:
    """``ddim (50 steps, η=0)``-style name of a sampler (``ddpm.viz.reverse.sampler_label``)."""
    from ddpm.viz.reverse import sampler_label

    return sampler_label(sampler)


# The pictures SampleGrid drew itself before they became callbacks of their own: a run config
# stored before the split (resume takes untouched callbacks from it) still names them.
DEPRECATED_KEYS = {
    "forward_picture": "~callbacks.forward_picture (ddpm.callbacks.pictures.ForwardProcessPicture)",
    "loss_by_t_images": "callbacks=[default,loss_by_t] callbacks.loss_by_t.num_samples=N "
    "(ddpm.callbacks.pictures.LossByTPicture)",
    "playground": "~callbacks.playground (ddpm.callbacks.playground.Playground)",
}


class SampleGrid(PictureCallback):
    """Save (and log) a grid of samples and a denoising strip every ``every_n_steps`` steps.

    Args:
        sampler: ``sampler(model, diffusion, shape, *, generator, return_intermediates, device)``
            (``ddpm.diffusion.samplers``; the Hydra ``sampler`` node). Default: DDIM, 50 steps.
        every_n_steps: cadence in optimizer steps (None or 0: only at the end of training).
        num_samples: images in the grid (a square number gives a square grid).
        batch_size: samples per sampler call (does not change the images).
        seed: sample i uses seed ``seed + i``.
        output_dir: where the PNGs go (default ``<trainer.default_root_dir>/samples``).
        at_train_end: also sample once when training ends (if not just done at that step).
        use_ema: sample with the EMA network when an EMA callback runs.
        nrow: images per grid row (default ceil(sqrt(num_samples))).
        strip_seeds: seeds of the denoising strip's rows (one x_t and one x̂₀ row each); empty
            disables the strip. For 2-D data the strip shows all ``num_samples`` points.
        strip_frames: number of timesteps shown in the strip.
        sample_shape: shape of one sample; default ``datamodule.sample_shape``.
        forward_picture, loss_by_t_images, playground: deprecated (a ``FutureWarning``): these
            pictures are callbacks of their own (:data:`DEPRECATED_KEYS`). A grid given any of
            them draws the pictures at its own steps as before (the unnamed ones with their
            former defaults: forward picture and playground on, loss by t off), unless the
            trainer runs that callback itself.
    """

    picture = "grid"
    hint = " (python src/sample.py ckpt_path=... draws samples)"
    skip_log_level = logging.INFO

    def __init__(
        self,
        sampler: Callable[..., Any] | None = None,
        every_n_steps: int | None = 500,
        num_samples: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        output_dir: str | None = None,
        at_train_end: bool = True,
        use_ema: bool = True,
        nrow: int | None = None,
        strip_seeds: Sequence[int] = (0, 1),
        strip_frames: int = 8,
        sample_shape: Sequence[int] | None = None,
        *,
        forward_picture: bool | None = None,
        loss_by_t_images: int | None = None,
        playground: bool | None = None,
    ) -> None:
        super().__init__(
            every_n_steps,
            at_train_end,
            num_samples=num_samples,
            output_dir=output_dir,
            use_ema=use_ema,
            seed=seed,
            sample_shape=sample_shape,
        )
        check_positive_int("batch_size", batch_size)
        check_positive_int("nrow", nrow, allow_none=True)
        check_positive_int("strip_frames", strip_frames)
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.nrow = nrow
        self.strip_seeds = [int(s) for s in strip_seeds]
        self.strip_frames = int(strip_frames)
        # the pictures a pre-split config asks this grid for (drawn after the grid and strip)
        self.pictures: list[PictureCallback] = self._deprecated_pictures(
            forward_picture, loss_by_t_images, playground
        )

    def _deprecated_pictures(
        self, forward_picture: bool | None, loss_by_t_images: int | None, playground: bool | None
    ) -> list[PictureCallback]:
        given = {
            k: v
            for k, v in dict(
                forward_picture=forward_picture,
                loss_by_t_images=loss_by_t_images,
                playground=playground,
            ).items()
            if v is not None
        }
        if not given:
            return []
        if loss_by_t_images is not None and (
            isinstance(loss_by_t_images, bool) or int(loss_by_t_images) < 0
        ):
            raise ValueError(f"loss_by_t_images must be an integer >= 0, got {loss_by_t_images!r}")
        warnings.warn(
            "SampleGrid: "
            + ", ".join(f"{k}={v!r}" for k, v in given.items())
            + " is deprecated: these pictures are callbacks of their own now, in the default "
            "callbacks (forward picture, playground) or added with callbacks=[default,loss_by_t]. "
            "Instead write: "
            + "; ".join(DEPRECATED_KEYS[k] for k in given)
            + ". This grid draws them as before.",
            FutureWarning,
            stacklevel=3,  # the caller of SampleGrid(...)
        )
        from ddpm.callbacks.pictures import ForwardProcessPicture, LossByTPicture
        from ddpm.callbacks.playground import Playground

        shared = dict(output_dir=self.output_dir, seed=self.seed)
        cadence = (self.every_n_steps, self.at_train_end)
        pictures: list[PictureCallback] = []
        if forward_picture is None or forward_picture:
            pictures.append(ForwardProcessPicture(*cadence, **shared))
        if loss_by_t_images:
            pictures.append(
                LossByTPicture(
                    *cadence, num_samples=int(loss_by_t_images), use_ema=self.use_ema, **shared
                )
            )
        if playground is None or playground:
            pictures.append(
                Playground(
                    self.sampler,
                    *cadence,
                    num_samples=self.num_samples,
                    use_ema=self.use_ema,
                    **shared,
                )
            )
        return pictures

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Leave the deprecated pictures to the trainer's own callbacks of those kinds."""
        own = {type(cb) for cb in trainer.callbacks if cb is not self}
        dropped = [type(p).__name__ for p in self.pictures if type(p) in own]
        if dropped:
            log.warning(
                "SampleGrid: %s run as callbacks of their own; the grid does not draw them too",
                ", ".join(dropped),
            )
            self.pictures = [p for p in self.pictures if type(p) not in own]

    # ------------------------------------------------------------------ work
    def draw(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: Any,
        shape: tuple[int, ...],
        out_dir: Path,
    ) -> list[Path]:
        """The grid and the strip (and the deprecated pictures); stops between sampler batches
        on a stop signal."""
        sampler = self.sampler if self.sampler is not None else default_sampler()
        diffusion = pl_module.diffusion
        device = model_device(model, pl_module.device)
        denorm = denormalizer(trainer)
        step = trainer.global_step
        written: list[Path] = []
        stop = lambda: preemption_requested(trainer)  # noqa: E731
        # the sampler's own progress bar on a terminal (log files get the lines below)
        extra = {"progress": True} if sys.stderr.isatty() else {}
        k = num_classes_of(model)
        labels, nrow, num_samples = None, self.nrow, self.num_samples
        if k is not None:  # one row per class
            labels, nrow = class_rows(self.num_samples, k)
            num_samples = len(labels)
        n_batches = -(-num_samples // self.batch_size)
        log.info(
            "SampleGrid: step %d, %d samples in %d batch(es) of %d with %s",
            step,
            num_samples,
            n_batches,
            self.batch_size,
            _describe(sampler),
        )
        start = time.monotonic()

        def announce(done: int, total: int) -> None:
            log.info("SampleGrid: batch %d/%d done (%.0f s)", done, total, time.monotonic() - start)

        samples = sample_with_seeds(
            sampler,
            model,
            diffusion,
            shape,
            range(self.seed, self.seed + num_samples),
            self.batch_size,
            device=device,
            stop=stop,
            announce=announce if n_batches > 1 else None,
            class_labels=labels,
            **extra,
        )
        if samples is None:
            log.info("SampleGrid: stopped on a signal before the grid was complete")
            return []
        path = out_dir / f"step_{step:07d}.png"
        if len(shape) == 1:
            if shape[0] != 2:
                log.warning("SampleGrid: cannot plot %d-D vectors; skipped", shape[0])
                return []
            save_scatter(denorm(samples) if denorm else samples, path, title=f"step {step}")
            grid = None
        else:
            grid = save_grid(samples, path, nrow=nrow, denormalize=denorm)
        written.append(path)
        log_image(trainer, "samples/grid", grid, path)

        strip_seeds = self.strip_seeds
        if len(shape) == 1 and strip_seeds:  # a point cloud needs many points
            strip_seeds = list(range(self.seed, self.seed + num_samples))
        if strip_seeds and not stop():
            traj = denoising_trajectory(
                sampler,
                model,
                diffusion,
                shape,
                strip_seeds,
                self.strip_frames,
                device=device,
                class_labels=None if k is None else balanced_labels(range(len(strip_seeds)), k),
            )
            if denorm is not None and len(shape) == 1:
                traj = {
                    **traj,
                    "x_t": denorm(traj["x_t"]),
                    "pred_xstart": denorm(traj["pred_xstart"]),
                }
            strip_path = save_denoising_strip(
                traj,
                out_dir / f"denoise_step_{step:07d}.png",
                denormalize=denorm if len(shape) > 1 else None,
                seeds=strip_seeds,
                title=f"Denoising at step {step}: {_describe(sampler)}",
            )
            written.append(strip_path)
            log_image(trainer, "samples/denoising", None, strip_path)
        for picture in self.pictures:
            if stop():
                return written
            written += picture.draw(trainer, pl_module, model, shape, out_dir)
        log.info("SampleGrid: step %d done in %.0f s", step, time.monotonic() - start)
        return written
