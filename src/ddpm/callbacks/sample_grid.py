"""Sample grids from fixed seeds while training, plus a denoising strip (x_t and x̂₀ over time).

Every ``every_n_steps`` optimizer steps rank 0 draws ``num_samples`` samples with the configured
sampler and the EMA weights (``pl_module.denoiser(use_ema=True)``), sample i from seed
``seed + i`` (:class:`~ddpm.utils.seeding.PerSampleGenerator`), so the same seeds give the same
grid whatever ``batch_size`` or the number of devices. The grid is saved as
``<output_dir>/step_0001000.png`` and the strip as ``<output_dir>/denoise_step_0001000.png``, and
both are logged to W&B / TensorBoard when those loggers are active. 2-D toy data gives scatter
plots instead of image grids. A class-conditional network gets one row per class (row k drawn
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

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ddpm.callbacks._common import (
    PeriodicCallback,
    denormalizer,
    first_samples,
    is_fast_dev_run,
    log_image,
    log_metrics_now,
    sample_shape_of,
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


def default_sampler() -> Callable[..., Any]:
    """DDIM with 50 steps (η = 0), used when no sampler is configured."""
    from ddpm.diffusion.samplers import DDIMSampler

    return DDIMSampler(steps=50)


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


class SampleGrid(PeriodicCallback):
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
        forward_picture: for images, draw the forward process of a few validation images under
            the run's schedule once (``forward.png``; ``visualize.py what=forward``).
        loss_by_t_images: for images, every grid also plots the bound's terms per timestep on
            this many validation images (``visualize.py what=loss_by_t``; T network calls per
            batch, so 0 = off by default).
        playground: for 2-D data, also draw the playground's score field and reverse trajectory
            and log ``val/energy_distance`` / ``val/mmd`` of the samples to validation points.
    """

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
        playground: bool = True,
        forward_picture: bool = True,
        loss_by_t_images: int = 0,
    ) -> None:
        super().__init__(every_n_steps, at_train_end)
        check_positive_int("num_samples", num_samples)
        check_positive_int("batch_size", batch_size)
        check_positive_int("nrow", nrow, allow_none=True)
        check_positive_int("strip_frames", strip_frames)
        if isinstance(loss_by_t_images, bool) or int(loss_by_t_images) < 0:
            raise ValueError(f"loss_by_t_images must be an integer >= 0, got {loss_by_t_images!r}")
        self.forward_picture = bool(forward_picture)
        self.loss_by_t_images = int(loss_by_t_images)
        self._forward_done = False
        self.sampler = sampler
        self.playground = bool(playground)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.output_dir = output_dir
        self.use_ema = bool(use_ema)
        self.nrow = nrow
        self.strip_seeds = [int(s) for s in strip_seeds]
        self.strip_frames = int(strip_frames)
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.saved: list[Path] = []  # every PNG written (rank 0)

    # ------------------------------------------------------------------ hooks
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The end-of-training grid, unless the run stopped on a signal or ended before its first
        grid (then the samples would be noise, and could take longer than the run)."""
        if not self.at_train_end or is_fast_dev_run(trainer):
            return
        if preemption_requested(trainer):
            log.info("SampleGrid: stopping on a signal, no end-of-training grid")
            return
        step = trainer.global_step
        if self.every_n_steps and step < self.every_n_steps:
            if trainer.is_global_zero:
                log.info(
                    "SampleGrid: the run ended at step %d, before its first grid (every %d steps):"
                    " no end-of-training grid (python src/sample.py ckpt_path=... draws samples)",
                    step,
                    self.every_n_steps,
                )
            return
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "samples")

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Path]:
        """Draw, save and log the grid and the strip now (rank 0 only; others return [])."""
        if not trainer.is_global_zero:
            return []
        if is_fast_dev_run(trainer):
            log.info("SampleGrid: skipped under fast_dev_run")
            return []
        sampler = self.sampler if self.sampler is not None else default_sampler()
        model = pl_module.denoiser(use_ema=self.use_ema)
        diffusion = pl_module.diffusion
        device = model_device(model, pl_module.device)
        shape = sample_shape_of(trainer, self.sample_shape, self._seen_shape)
        denorm = denormalizer(trainer)
        step = trainer.global_step
        out_dir = self._dir(trainer)
        written: list[Path] = []
        was_training = model.training
        model.eval()
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

        try:
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
            if stop():
                return written
            if shape == (2,) and self.playground:
                written += self._playground(trainer, model, diffusion, sampler, out_dir, device)
            if len(shape) == 3:
                written += self._image_pictures(trainer, model, diffusion, out_dir, device, denorm)
        finally:
            model.train(was_training)
            self.saved.extend(written)
        log.info("SampleGrid: step %d done in %.0f s", step, time.monotonic() - start)
        return written

    def _image_pictures(
        self,
        trainer: pl.Trainer,
        model: Any,
        diffusion: Any,
        out_dir: Path,
        device: torch.device,
        denorm: Callable[[Tensor], Tensor] | None,
    ) -> list[Path]:
        """Images: the forward process of validation images under this run's schedule (once,
        ``forward.png``, as ``what=forward``) and, with ``loss_by_t_images`` > 0, the bound's
        terms per timestep on that many validation images (``loss_by_t_step_*.png``, as
        ``what=loss_by_t``; T network calls per batch)."""
        want_forward = self.forward_picture and not self._forward_done
        if not (want_forward or self.loss_by_t_images):
            return []
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not callable(getattr(dm, "val_dataloader", None)):
            return []
        x0 = first_samples(
            dm.val_dataloader(), max(8 if want_forward else 0, self.loss_by_t_images)
        )
        if x0 is None:
            return []
        import matplotlib.pyplot as plt

        from ddpm.viz.forward import forward_diffusion, forward_figure, forward_timesteps
        from ddpm.viz.loss import loss_by_t_figure, loss_by_timestep
        from ddpm.viz.plots import save_figure

        written: list[Path] = []
        if want_forward:
            self._forward_done = True
            label = str(getattr(diffusion, "schedule", "schedule"))
            result = forward_diffusion(
                x0[:8],
                {label: diffusion},
                forward_timesteps(diffusion.num_timesteps),
                generator=torch.Generator().manual_seed(self.seed),
            )
            fig = forward_figure(result, denormalize=denorm)
            path = save_figure(fig, out_dir / "forward.png")
            plt.close(fig)
            log_image(trainer, "samples/forward", None, path)
            written.append(path)
        if self.loss_by_t_images:
            step = trainer.global_step
            result = loss_by_timestep(
                model,
                diffusion,
                x0[: self.loss_by_t_images].to(device),
                generator=torch.Generator(device=device).manual_seed(self.seed),
            )
            fig = loss_by_t_figure(result, title=f"step {step}")
            path = save_figure(fig, out_dir / f"loss_by_t_step_{step:07d}.png")
            plt.close(fig)
            log_image(trainer, "samples/loss_by_t", None, path)
            written.append(path)
        return written

    def _playground(
        self,
        trainer: pl.Trainer,
        model: Any,
        diffusion: Any,
        sampler: Any,
        out_dir: Path,
        device: torch.device,
    ) -> list[Path]:
        """2-D data: the playground's score field and reverse trajectory (``ddpm.viz``) and the
        energy distance / MMD of samples to validation points, logged as ``val/*``."""
        from ddpm.viz.playground import playground_figures, playground_report
        from ddpm.viz.plots import save_figure

        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            return []
        ref = first_samples(dm.val_dataloader(), self.num_samples)
        if ref is None:
            return []
        guided = getattr(sampler, "guidance_scale", 1.0) != 1.0
        if num_classes_of(model) is not None and guided and dataclasses.is_dataclass(sampler):
            # the playground compares with all validation points: the unconditional branch
            sampler = dataclasses.replace(sampler, guidance_scale=1.0)
        report = playground_report(
            model, diffusion, ref, {"sampler": sampler}, seed=self.seed, device=device
        )
        d = report["distances"]["sampler"]
        log_metrics_now(trainer, {"val/energy_distance": d["energy_distance"], "val/mmd": d["mmd"]})
        figs = playground_figures(report)
        step = trainer.global_step
        written = []
        for name in ("score", "reverse"):
            path = save_figure(figs[name], out_dir / f"{name}_step_{step:07d}.png")
            log_image(trainer, f"samples/{name}", None, path)
            written.append(path)
        import matplotlib.pyplot as plt

        for fig in figs.values():
            plt.close(fig)
        return written
