"""The LightningModule: an ε-network (or x₀/v-network) trained with a diffusion objective.

Thin glue: the network comes from ``ddpm.nn``, the process and loss from ``ddpm.diffusion``,
the optimizer and LR schedule from config (``_partial_`` callables). Every random draw of a
training step (timesteps, noise, label dropout, dropout) comes from streams seeded by (seed,
rank, epoch, batch) (:mod:`ddpm.run.rng`), so a resumed run draws what the uninterrupted one drew
without any RNG state in the checkpoint. Validation uses a generator seeded by (val_seed, batch, rank) so
``val/loss`` is comparable across evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch import Tensor, nn

from ddpm.contracts import HoldsEMA
from ddpm.diffusion import (
    DiffusionLoss,
    GaussianDiffusion,
    LossSecondMomentTimestepSampler,
    UniformTimestepSampler,
)
from ddpm.run.rng import seed_global_rngs, seeded_generator, step_seed
from ddpm.utils.classes import with_labels

CONFIG_KEY = "ddpm_config"
T_SAMPLER_KEY = "ddpm_t_sampler"
_GLOBAL_STREAM, _NOISE_STREAM = 0, 1


def find_ema(trainer: pl.Trainer | None) -> HoldsEMA | None:
    """The EMA callback attached to ``trainer`` (:class:`~ddpm.contracts.HoldsEMA` with weights),
    if any."""
    if trainer is None:
        return None
    for cb in trainer.callbacks:
        if isinstance(cb, HoldsEMA) and cb.ema_net is not None:
            return cb
    return None


class DiffusionModule(pl.LightningModule):
    """Wraps ``net`` and the diffusion loss.

    Args:
        net: ``net(x_t, t, class_labels=None) -> output`` (``ddpm.nn``); output channels must
            match the diffusion's ``model_output_channels``. A class-conditional network (with
            a ``null_class``) trains on ``(x, labels)`` batches.
        diffusion: the :class:`GaussianDiffusion` (schedule, prediction and variance type).
        loss: a :class:`DiffusionLoss` (simple / hybrid / vlb).
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``).
        lr_scheduler: ``optimizer -> LRScheduler`` stepped every optimizer step, or None.
        timestep_sampler: ``uniform`` or ``loss_second_moment`` (improved DDPM importance sampling).
        val_seed: seed of the validation generator (same t and noise at every evaluation).
        train_seed: seed of the training t/noise generator (offset by rank).
        compile: wrap the network in ``torch.compile`` for training.
        run_config: the resolved run config (plain dict) stored in every checkpoint.
        p_uncond: probability that a training label is replaced by the null class, so one
            network learns ε(x_t, y) and ε(x_t) for classifier-free guidance (Ho & Salimans
            2022, Alg. 1: 0.1-0.2); drawn from the step's seeded noise stream.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        loss: DiffusionLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        timestep_sampler: str = "uniform",
        val_seed: int = 1234,
        train_seed: int = 0,
        compile: bool = False,
        run_config: dict | None = None,
        p_uncond: float = 0.1,
    ) -> None:
        super().__init__()
        loss.check(diffusion)
        if isinstance(p_uncond, bool) or not 0.0 <= float(p_uncond) <= 1.0:
            raise ValueError(f"p_uncond must be a probability in [0, 1], got {p_uncond!r}")
        self.p_uncond = float(p_uncond)
        self.net = net
        self.diffusion = diffusion
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        if timestep_sampler == "uniform":
            self.t_sampler = UniformTimestepSampler(diffusion.num_timesteps)
        elif timestep_sampler == "loss_second_moment":
            self.t_sampler = LossSecondMomentTimestepSampler(diffusion.num_timesteps)
        else:
            raise ValueError(
                "timestep_sampler must be one of ['uniform', 'loss_second_moment'], "
                f"got {timestep_sampler!r}"
            )
        self.val_seed = int(val_seed)
        self.train_seed = int(train_seed)
        self.run_config = run_config
        self.compile = bool(compile)
        self.validated_step: int | None = None  # global step of the latest validation
        # Kept out of the module registry (no duplicate keys in the state_dict).
        self.__dict__["_train_net"] = torch.compile(net) if compile else net

    def _seed_step(self, device: torch.device, batch_idx: int) -> torch.Generator:
        """Seed the global RNGs (dropout) for this micro-batch and return the generator of its
        timesteps and noise, both keyed by (train_seed, rank, epoch, batch_idx)."""
        position = (self.global_rank, self.current_epoch, batch_idx)
        seed_global_rngs(step_seed(self.train_seed, _GLOBAL_STREAM, *position))
        return seeded_generator(step_seed(self.train_seed, _NOISE_STREAM, *position), device)

    # ------------------------------------------------------------------ inference helpers
    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None:
            return self.net(x_t, t)
        return self.net(x_t, t, class_labels=class_labels)

    def denoiser(self, use_ema: bool = True) -> nn.Module:
        """The network to sample with: the EMA copy when an EMA callback runs, else ``net``."""
        ema = find_ema(self._trainer) if use_ema else None
        return ema.ema_net if ema is not None else self.net

    # ------------------------------------------------------------------ training
    def _losses(
        self, net: Callable[..., Tensor], x0: Tensor, t: Tensor, noise: Tensor | None
    ) -> dict[str, Tensor]:
        return self.loss_fn(net, self.diffusion, x0, t, noise)

    def _split_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """(x0, labels): labels of a class-conditional network's ``(x, labels)`` batch, else
        None (an unconditional network ignores any labels the data carries)."""
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        if getattr(self.net, "null_class", None) is None:
            return x0, None
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(
                f"the network is class-conditional (num_classes={self.net.null_class}) but the "
                "training batches carry no labels: train with data.conditional=true"
            )
        return x0, batch[1]

    def drop_labels(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): each label becomes
        the null class with probability ``p_uncond`` (one uniform draw per label)."""
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.p_uncond
        return torch.where(drop, torch.full_like(labels, int(self.net.null_class)), labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = self._split_batch(batch)
        g = self._seed_step(x0.device, batch_idx)
        t, weights = self.t_sampler.sample(x0.shape[0], x0.device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        if labels is not None:  # after t and noise: those draws are the unconditional run's
            labels = self.drop_labels(labels, g)
        net = with_labels(self.__dict__["_train_net"], labels)
        terms = self._losses(net, x0, t, noise)
        if isinstance(self.t_sampler, LossSecondMomentTimestepSampler):
            per_sample = (terms["vb"] if "vb" in terms else terms["loss"]).detach()
            finite = torch.isfinite(per_sample)  # a NaN must not poison the sampler's history
            self.t_sampler.update(t[finite], per_sample[finite])
        loss = (terms["loss"] * weights).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/mse", terms["mse"].mean(), on_step=True, on_epoch=False)
        if "vb" in terms:
            self.log("train/vb", terms["vb"].mean(), on_step=True, on_epoch=False)
        if self.trainer is not None and (batch_idx % max(1, self.trainer.log_every_n_steps) == 0):
            self._log_quartiles("train", t, terms["loss"].detach())
        return loss

    def _log_quartiles(self, prefix: str, t: Tensor, per_sample: Tensor, **kw: Any) -> None:
        """Loss by quartile of t (q0 = smallest t, least noise)."""
        q = (t * 4 // self.diffusion.num_timesteps).clamp(max=3)
        for i in range(4):
            m = q == i
            cnt = m.sum()
            val = torch.where(cnt > 0, (per_sample * m).sum() / cnt.clamp(min=1), torch.nan)
            self.log(
                f"{prefix}/loss_q{i}",
                val,
                on_step=prefix == "train",
                on_epoch=prefix != "train",
                **kw,
            )

    # ------------------------------------------------------------------ validation
    def _val_noise(self, x0: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        """Timesteps and noise from a generator seeded by (val_seed, batch index, rank)."""
        g = torch.Generator().manual_seed(
            self.val_seed * 100003 + batch_idx * 7919 + 1000003 * self.global_rank
        )
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return t.to(x0.device), noise.to(x0.device, x0.dtype)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0, labels = self._split_batch(batch)  # the conditional loss: no label dropout
        t, noise = self._val_noise(x0, batch_idx)
        terms = self._losses(with_labels(self.net, labels), x0, t, noise)
        self.log("val/loss", terms["loss"].mean(), prog_bar=True, sync_dist=True)
        self._log_quartiles("val", t, terms["loss"], sync_dist=True)
        ema = find_ema(self._trainer)
        if ema is not None:
            ema_terms = self._losses(with_labels(ema.ema_net, labels), x0, t, noise)
            self.log("val/loss_ema", ema_terms["loss"].mean(), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.validated_step = self.global_step

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=self.net.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning does, also for fused optimizers under mixed precision, which
        Lightning refuses (Lightning issue #21435) although bf16 scales no gradients and, under
        fp16, torch's ``GradScaler.unscale_`` before a fused step is supported (the step then
        does not unscale again)."""
        plugin = self.trainer.precision_plugin
        fused = any(group.get("fused") for group in optimizer.param_groups)
        if not (gradient_clip_val and fused and isinstance(plugin, MixedPrecision)):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        if plugin.scaler is not None:
            plugin.scaler.unscale_(optimizer)
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
        Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the run config (plain data) and the importance sampler's loss history (tensors):
        the checkpoint stays ``weights_only``-loadable."""
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
        if isinstance(self.t_sampler, LossSecondMomentTimestepSampler):
            state = self.t_sampler.state_dict()
            checkpoint[T_SAMPLER_KEY] = {k: torch.from_numpy(v) for k, v in state.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(T_SAMPLER_KEY)
        if state is not None and isinstance(self.t_sampler, LossSecondMomentTimestepSampler):
            self.t_sampler.load_state_dict({k: v.numpy() for k, v in state.items()})
