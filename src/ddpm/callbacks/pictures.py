"""Pictures of image runs while training, as ``visualize.py`` draws them from a checkpoint.

* :class:`ForwardProcessPicture`: the forward process q(x_t | x_0) (Ho et al. 2020, eq. 4) of the
  first validation images under the run's schedule, once (``forward.png``, as ``what=forward``).
* :class:`LossByTPicture`: the bound's terms L_0, L_t, L_T (Ho et al. 2020, eq. 5) and the MSE per
  timestep on the first validation images, at every cadence step
  (``loss_by_t_step_0001000.png``, as ``what=loss_by_t``; T network calls per batch).

Both draw for image data only (other data: nothing) and log the PNG (``samples/forward``,
``samples/loss_by_t``); the cadence, rank-0 drawing and output directory are
:class:`~ddpm.callbacks._common.PictureCallback`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ddpm.callbacks._common import (
    PictureCallback,
    denormalizer,
    log_figure,
    validation_samples,
)
from ddpm.utils.devices import model_device


class ForwardProcessPicture(PictureCallback):
    """Draw the forward process of ``num_samples`` validation images once, at the first cadence
    step (or at the end of training with ``every_n_steps`` None / 0).

    Args:
        every_n_steps: cadence in optimizer steps (the config follows the sample grid's).
        at_train_end: draw at the end of training if not drawn before.
        num_samples: validation images shown (rows).
        seed: seed of the noise.
        output_dir: where ``forward.png`` goes (default ``<trainer.default_root_dir>/samples``).
    """

    picture = "forward-process picture"

    def __init__(
        self,
        every_n_steps: int | None = 500,
        at_train_end: bool = True,
        num_samples: int = 8,
        seed: int = 0,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(
            every_n_steps, at_train_end, num_samples=num_samples, output_dir=output_dir, seed=seed
        )
        self.done = False

    def draw(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: Any,
        shape: tuple[int, ...],
        out_dir: Path,
    ) -> list[Path]:
        if self.done or len(shape) != 3:
            return []
        x0 = validation_samples(trainer, self.num_samples)
        if x0 is None:
            return []
        from ddpm.viz.forward import forward_diffusion, forward_figure, forward_timesteps

        self.done = True
        diffusion = pl_module.diffusion
        label = str(getattr(diffusion, "schedule", "schedule"))
        result = forward_diffusion(
            x0,
            {label: diffusion},
            forward_timesteps(diffusion.num_timesteps),
            generator=torch.Generator().manual_seed(self.seed),
        )
        fig = forward_figure(result, denormalize=denormalizer(trainer))
        return [log_figure(trainer, fig, out_dir / "forward.png", "samples/forward")]


class LossByTPicture(PictureCallback):
    """Plot the bound's terms per timestep on ``num_samples`` validation images every
    ``every_n_steps`` steps (T network calls per batch: keep it small).

    Args:
        every_n_steps: cadence in optimizer steps (the config follows the sample grid's).
        at_train_end: also draw when training ends (if not just done at that step).
        num_samples: validation images the terms are averaged over.
        seed: seed of the noise.
        use_ema: evaluate the EMA network when an EMA callback runs.
        output_dir: where the PNGs go (default ``<trainer.default_root_dir>/samples``).
    """

    picture = "loss-by-t picture"

    def __init__(
        self,
        every_n_steps: int | None = 500,
        at_train_end: bool = True,
        num_samples: int = 16,
        seed: int = 0,
        use_ema: bool = True,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(
            every_n_steps,
            at_train_end,
            num_samples=num_samples,
            output_dir=output_dir,
            use_ema=use_ema,
            seed=seed,
        )

    def draw(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: Any,
        shape: tuple[int, ...],
        out_dir: Path,
    ) -> list[Path]:
        if len(shape) != 3:
            return []
        x0 = validation_samples(trainer, self.num_samples)
        if x0 is None:
            return []
        from ddpm.viz.loss import loss_by_t_figure, loss_by_timestep

        device = model_device(model, pl_module.device)
        step = trainer.global_step
        result = loss_by_timestep(
            model,
            pl_module.diffusion,
            x0.to(device),
            generator=torch.Generator(device=device).manual_seed(self.seed),
        )
        fig = loss_by_t_figure(result, title=f"step {step}")
        path = out_dir / f"loss_by_t_step_{step:07d}.png"
        return [log_figure(trainer, fig, path, "samples/loss_by_t")]
