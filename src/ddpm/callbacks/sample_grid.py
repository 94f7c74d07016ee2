"""Sample grids from fixed seeds while training, plus a denoising strip (x_t and x̂₀ over time).

Every ``every_n_steps`` optimizer steps rank 0 draws ``num_samples`` samples with the configured
sampler and the EMA weights (``pl_module.denoiser(use_ema=True)``), sample i from seed
``seed + i`` (:class:`~ddpm.utils.seeding.PerSampleGenerator`), so the same seeds give the same
grid whatever ``batch_size`` or the number of devices. The grid is saved as
``<output_dir>/step_0001000.png`` and the strip as ``<output_dir>/denoise_step_0001000.png``, and
both are logged to W&B / TensorBoard when those loggers are active. 2-D toy data gives scatter
plots instead of image grids (the strip: :func:`ddpm.viz.reverse.reverse_figure`, the picture of
``visualize.py what=reverse``). The other pictures of a run have callbacks of their own
(:mod:`ddpm.callbacks.forward_picture`, :mod:`ddpm.callbacks.loss_by_t`,
:mod:`ddpm.callbacks.playground`). A class-conditional network gets one row per class (row k
drawn for class k, with the sampler's ``guidance_scale``; ``ddpm.utils.classes.class_rows``), and
the strip's row j is drawn for class j. Other ranks skip (no collective inside), so under DDP
they simply wait for rank 0 at the next gradient all-reduce.

Sampling is announced in the log with a line per batch (and the sampler's progress bar on a
terminal); between batches it stops when a stop signal arrived (the checkpoint is written all the
same). Every run ends with a grid, however short: the end-of-training grid is sized so that it
costs about :data:`END_BUDGET` of the run's time (a grid of 64 images x 50 steps through a 64x64
U-Net can take longer than a smoke test's whole run on a CPU): a probe of the sampler times a
sample-step, then the strip is dropped, the samples halved (down to 4) and the steps halved (down
to 2) until it fits, and the log says what was drawn instead of what.
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

from ddpm.callbacks.inputs import default_sampler, denormalizer
from ddpm.callbacks.picture import PictureCallback, log_figure, log_image
from ddpm.callbacks.preemption import preemption_requested
from ddpm.diffusion.samplers.seeded import sample_batches
from ddpm.utils.checks import check_positive_int
from ddpm.utils.classes import balanced_labels, class_rows, num_classes_of
from ddpm.utils.devices import model_device
from ddpm.utils.images import save_grid
from ddpm.utils.progress import hms
from ddpm.viz.plots import scatter_figure
from ddpm.viz.reverse import denoising_trajectory, reverse_figure, sampler_label

log = logging.getLogger(__name__)

END_BUDGET = 0.1  # share of the run's time the end-of-training grid may take
MIN_SAMPLES, MIN_STEPS = 4, 2  # the smallest end-of-training grid


@torch.inference_mode()
def sample_with_seeds(
    sampler: Callable[..., Any],
    net: Callable[[Tensor, Tensor], Tensor],
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
        net,
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


class SampleGrid(PictureCallback):
    """Save (and log) a grid of samples and a denoising strip every ``every_n_steps`` steps.

    Args:
        sampler: ``sampler(net, diffusion, shape, *, generator, return_intermediates, device)``
            (``ddpm.diffusion.samplers``; the Hydra ``sampler`` node). Default: DDIM, 50 steps.
        num_samples: images in the grid (a square number gives a square grid).
        batch_size: samples per sampler call (does not change the images).
        seed: sample i uses seed ``seed + i``.
        nrow: images per grid row (default ceil(sqrt(num_samples))).
        strip_seeds: seeds of the denoising strip's rows (one x_t and one x̂₀ row each); empty
            disables the strip. For 2-D data the strip shows all ``num_samples`` points.
        strip_frames: number of timesteps shown in the strip.
        every_n_steps, at_train_end, use_ema, output_dir, sample_shape:
            :class:`~ddpm.callbacks.picture.PictureCallback`'s.
    """

    picture = "grid"
    skips_before_first = False  # every run ends with a grid, sized to the run (END_BUDGET)

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
    ) -> None:
        super().__init__(
            every_n_steps, at_train_end, num_samples, seed, use_ema, output_dir, sample_shape
        )
        check_positive_int("batch_size", batch_size)
        check_positive_int("nrow", nrow, allow_none=True)
        check_positive_int("strip_frames", strip_frames)
        self.sampler = sampler if sampler is not None else default_sampler()
        self.batch_size = int(batch_size)
        self.nrow = nrow
        self.strip_seeds = [int(s) for s in strip_seeds]
        self.strip_frames = int(strip_frames)
        self._started: float | None = None  # this fit's start
        self._budget: float | None = None  # seconds the end-of-training grid may take

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started is not None:
            self._budget = END_BUDGET * (time.monotonic() - self._started)
        try:
            super().on_train_end(trainer, pl_module)
        finally:
            self._budget = None

    def _within_budget(
        self, net: Any, diffusion: Any, shape: tuple[int, ...], device: Any, k: int | None
    ) -> tuple[Any, int, bool]:
        """(sampler, samples, strip) of an end-of-training grid that fits ``self._budget``:
        timed on a 2-step probe, then the strip dropped, the samples and then the steps halved
        (down to :data:`MIN_SAMPLES` / :data:`MIN_STEPS`)."""
        steps = full_steps = sampler_steps(self.sampler, diffusion)
        if not (dataclasses.is_dataclass(self.sampler) and hasattr(self.sampler, "steps")):
            return self.sampler, self.num_samples, bool(self.strip_seeds)
        n_probe = min(self.batch_size, MIN_SAMPLES)
        probe = dataclasses.replace(self.sampler, steps=min(MIN_STEPS, steps))
        labels = None if k is None else balanced_labels(range(n_probe), k)
        start = time.monotonic()
        sample_with_seeds(
            probe, net, diffusion, shape, range(n_probe), n_probe, device, class_labels=labels
        )
        per = (time.monotonic() - start) / (n_probe * probe.steps)  # one sample, one step
        budget = max(0.0, (self._budget or 0.0) - (time.monotonic() - start))
        n, strip = self.num_samples, bool(self.strip_seeds)

        def cost() -> float:
            return per * steps * (n + (len(self.strip_seeds) if strip else 0))

        if cost() > budget:
            strip = False
        while cost() > budget and n > MIN_SAMPLES:
            n = max(MIN_SAMPLES, n // 2)
        while cost() > budget and steps > MIN_STEPS:
            steps = max(MIN_STEPS, steps // 2)
        if (n, steps, strip) != (self.num_samples, full_steps, bool(self.strip_seeds)):
            log.info(
                "SampleGrid: end of training: %d samples x %d steps%s instead of %d x %d, to take "
                "about %d%% of the run's %s",
                n,
                steps,
                "" if strip else ", no strip",
                self.num_samples,
                full_steps,
                round(100 * END_BUDGET),
                hms((self._budget or 0.0) / END_BUDGET),
            )
        return dataclasses.replace(self.sampler, steps=steps), n, strip

    # ------------------------------------------------------------------ work
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: Any) -> list[Path]:
        """The grid and the strip; stops between sampler batches on a stop signal."""
        shape = self.shape(trainer)
        device = model_device(net, pl_module.device)
        denorm = denormalizer(trainer)
        step, out = trainer.global_step, self.out_dir(trainer)
        stop = lambda: preemption_requested(trainer)  # noqa: E731
        # the sampler's own progress bar on a terminal (log files get the lines below)
        extra = {"progress": True} if sys.stderr.isatty() else {}
        k = num_classes_of(net)
        sampler, num_samples, strip = self.sampler, self.num_samples, bool(self.strip_seeds)
        if self._budget is not None:  # the end-of-training grid: sized to the run
            sampler, num_samples, strip = self._within_budget(
                net, pl_module.diffusion, shape, device, k
            )
        labels, nrow = None, self.nrow if num_samples == self.num_samples else None
        if k is not None:  # one row per class
            labels, nrow = class_rows(num_samples, k)
            num_samples = len(labels)
        n_batches = -(-num_samples // self.batch_size)
        log.info(
            "SampleGrid: step %d, %d samples in %d batch(es) of %d with %s",
            step,
            num_samples,
            n_batches,
            self.batch_size,
            sampler_label(sampler),
        )
        start = time.monotonic()

        def announce(done: int, total: int) -> None:
            log.info("SampleGrid: batch %d/%d done (%.0f s)", done, total, time.monotonic() - start)

        samples = sample_with_seeds(
            sampler,
            net,
            pl_module.diffusion,
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
        path = out / f"step_{step:07d}.png"
        if len(shape) == 1:
            if shape[0] != 2:
                log.warning("SampleGrid: cannot plot %d-D vectors; skipped", shape[0])
                return []
            points = denorm(samples) if denorm else samples
            written = [
                log_figure(trainer, scatter_figure(points, f"step {step}"), path, "samples/grid")
            ]
        else:
            grid = save_grid(samples, path, nrow=nrow, denormalize=denorm)
            log_image(trainer, "samples/grid", grid, path)
            written = [path]

        strip_seeds = self.strip_seeds if strip else []
        if len(shape) == 1 and strip_seeds:  # a point cloud needs many points
            strip_seeds = list(range(self.seed, self.seed + num_samples))
        if strip_seeds and not stop():
            traj = denoising_trajectory(
                sampler,
                net,
                pl_module.diffusion,
                shape,
                strip_seeds,
                num_frames=self.strip_frames,
                device=device,
                class_labels=None if k is None else balanced_labels(range(len(strip_seeds)), k),
            )
            if denorm is not None and len(shape) == 1:
                traj = {
                    **traj,
                    "x_t": denorm(traj["x_t"]),
                    "pred_xstart": denorm(traj["pred_xstart"]),
                }
            title = f"Denoising at step {step}: {sampler_label(sampler)}"
            fig = reverse_figure(traj, strip_seeds, title, denorm if len(shape) > 1 else None)
            strip_path = out / f"denoise_step_{step:07d}.png"
            written.append(log_figure(trainer, fig, strip_path, "samples/denoising"))
        log.info("SampleGrid: step %d done in %.0f s", step, time.monotonic() - start)
        return written


def sampler_steps(sampler: Any, diffusion: Any) -> int:
    """The steps ``sampler`` takes (DDPM's ``None``: all T)."""
    return int(getattr(sampler, "steps", None) or diffusion.num_timesteps)
