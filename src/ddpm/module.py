"""The LightningModule: an ε-network (or x₀/v-network) trained with a diffusion objective.

Thin glue: the network comes from ``ddpm.nn``, the process and loss from ``ddpm.diffusion``,
the optimizer and LR schedule from config (``_partial_`` callables). Validation uses a seeded
generator so ``val/loss`` is comparable across evaluations.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import GradClipAlgorithmType
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ddpm.diffusion import DiffusionLoss, GaussianDiffusion, LossSecondMomentSampler, UniformSampler

CONFIG_KEY = "ddpm_config"
GENERATOR_KEY = "ddpm_generator_state"
RNG_KEY = "ddpm_rng_states"


def rng_state_tensors(device: torch.device | None = None) -> dict[str, Tensor]:
    """This process's global RNG states (torch CPU, CUDA of ``device``, NumPy, Python) as tensors,
    so that checkpoints holding them stay loadable with ``torch.load(weights_only=True)``."""
    py_version, py_internal, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    states = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "python_extra": torch.tensor(
            [py_version, py_gauss is not None, 0.0 if py_gauss is None else py_gauss],
            dtype=torch.float64,
        ),
    }
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Tensor], device: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state_tensors`."""
    # clone(): torch.set_rng_state crashes (segfault) on a view with a storage offset, such as
    # one rank's row of the gathered (world, n) states.
    states = {k: v.detach().cpu().clone() for k, v in states.items()}
    torch.set_rng_state(states["torch"].to(torch.uint8))
    ne = states["numpy_extra"].tolist()
    np.random.set_state(  # noqa: NPY002 - the global legacy RNG is what we restore
        (
            "MT19937",
            states["numpy"].cpu().numpy().astype(np.uint32),
            int(ne[0]),
            int(ne[1]),
            float(ne[2]),
        )
    )
    pe = states["python_extra"].tolist()
    random.setstate(
        (
            int(pe[0]),
            tuple(int(v) for v in states["python"].tolist()),
            float(pe[2]) if pe[1] else None,
        )
    )
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].to(torch.uint8), device)


def find_ema(trainer: pl.Trainer | None) -> Any | None:
    """The EMA callback attached to ``trainer`` (anything with an ``ema_net`` attribute), if any."""
    if trainer is None:
        return None
    for cb in trainer.callbacks:
        if getattr(cb, "ema_net", None) is not None:
            return cb
    return None


class DiffusionModule(pl.LightningModule):
    """Wraps ``net`` and the diffusion loss.

    Args:
        net: ``net(x_t, t) -> output`` (``ddpm.nn``); output channels must match the diffusion's
            ``model_output_channels``.
        diffusion: the :class:`GaussianDiffusion` (schedule, prediction and variance type).
        loss: a :class:`DiffusionLoss` (simple / hybrid / vlb).
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``).
        lr_scheduler: ``optimizer -> LRScheduler`` stepped every optimizer step, or None.
        timestep_sampler: ``uniform`` or ``loss_second_moment`` (improved DDPM importance sampling).
        val_seed: seed of the validation generator (same t and noise at every evaluation).
        train_seed: seed of the training t/noise generator (offset by rank).
        compile: wrap the network in ``torch.compile`` for training.
        run_config: the resolved run config (plain dict) stored in every checkpoint.
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
    ) -> None:
        super().__init__()
        loss.check(diffusion)
        self.net = net
        self.diffusion = diffusion
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        if timestep_sampler == "uniform":
            self.t_sampler = UniformSampler(diffusion.num_timesteps)
        elif timestep_sampler == "loss_second_moment":
            self.t_sampler = LossSecondMomentSampler(diffusion.num_timesteps)
        else:
            raise ValueError(
                "timestep_sampler must be one of ['uniform', 'loss_second_moment'], "
                f"got {timestep_sampler!r}"
            )
        self.val_seed = int(val_seed)
        self.train_seed = int(train_seed)
        self.run_config = run_config
        self.compile = bool(compile)
        # Kept out of the module registry (no duplicate keys in the state_dict).
        self.__dict__["_train_net"] = torch.compile(net) if compile else net
        self.__dict__["_generator"] = None

    def _train_generator(self, device: torch.device) -> torch.Generator:
        """The training-noise generator: seeded per rank (ranks draw different t and ε), saved
        in checkpoints so a resumed run draws the same noise as an uninterrupted one."""
        g = self.__dict__["_generator"]
        if g is None or g.device != device:
            g = torch.Generator(device=device)
            g.manual_seed(self.train_seed * 1_000_003 + 7919 * self.global_rank)
            pending = self.__dict__.pop("_pending_generator_state", None)
            if pending is not None:
                g.set_state(pending)
            self.__dict__["_generator"] = g
        return g

    # ------------------------------------------------------------------ inference helpers
    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.net(x_t, t)

    def denoiser(self, use_ema: bool = True) -> nn.Module:
        """The network to sample with: the EMA copy when an EMA callback runs, else ``net``."""
        ema = find_ema(self._trainer) if use_ema else None
        return ema.ema_net if ema is not None else self.net

    # ------------------------------------------------------------------ training
    def _losses(
        self, net: nn.Module, x0: Tensor, t: Tensor, noise: Tensor | None
    ) -> dict[str, Tensor]:
        return self.loss_fn(self.diffusion, net, x0, t, noise)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        g = self._train_generator(x0.device)
        t, weights = self.t_sampler.sample(x0.shape[0], x0.device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        terms = self._losses(self.__dict__["_train_net"], x0, t, noise)
        if isinstance(self.t_sampler, LossSecondMomentSampler):
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

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        t, noise = self._val_noise(x0, batch_idx)
        terms = self._losses(self.net, x0, t, noise)
        self.log("val/loss", terms["loss"].mean(), prog_bar=True, sync_dist=True)
        self._log_quartiles("val", t, terms["loss"], sync_dist=True)
        ema = find_ema(self._trainer)
        if ema is not None:
            ema_terms = self._losses(ema.ema_net, x0, t, noise)
            self.log("val/loss_ema", ema_terms["loss"].mean(), prog_bar=True, sync_dist=True)

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

    # ------------------------------------------------------------------ RNG around validation
    def on_validation_model_zero_grad(self) -> None:
        """Validation inside ``fit`` must not move the global RNG streams (its DataLoader draws a
        seed from them): snapshot here, restore in :meth:`on_validation_end`. Training then draws
        the same dropout masks and data order whether or not (and how often) it validates, and a
        run resumed from a checkpoint draws what the uninterrupted run drew."""
        super().on_validation_model_zero_grad()
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self.__dict__["_rng_before_val"] = rng_state_tensors(self.device)

    def on_fit_start(self) -> None:
        self.__dict__.pop("_rng_before_val", None)  # left over by a failed earlier fit

    def on_validation_end(self) -> None:
        states = self.__dict__.pop("_rng_before_val", None)
        if states is not None:
            set_rng_states(states, self.device)

    # ------------------------------------------------------------------ checkpoints
    def _gather_rows(self, state: Tensor) -> Tensor:
        """(world, n): every rank's 1-D ``state`` (collective when world > 1)."""
        world = self.trainer.world_size
        if world > 1:
            return self.all_gather(state.to(self.device)).cpu().reshape(world, -1)
        return state.reshape(1, -1).clone()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the run config (plain data), every rank's training-noise generator and global RNG
        states (tensors only: the checkpoint stays ``weights_only``-loadable). Collective: runs
        on every rank."""
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
        if self._trainer is None:
            return
        # Creates the generator if no step ran yet (applying a state loaded from a checkpoint).
        g = self._train_generator(self.device)
        checkpoint[GENERATOR_KEY] = self._gather_rows(g.get_state())
        # Inside validation the live state was moved by validation: store the training stream's.
        states = self.__dict__.get("_rng_before_val") or rng_state_tensors(self.device)
        checkpoint[RNG_KEY] = {k: self._gather_rows(v.flatten()) for k, v in sorted(states.items())}
        if isinstance(self.t_sampler, LossSecondMomentSampler):
            checkpoint["ddpm_t_sampler"] = {
                k: torch.from_numpy(v) for k, v in self.t_sampler.state_dict().items()
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(GENERATOR_KEY)
        self.__dict__["_generator"] = None
        self.__dict__.pop("_pending_generator_state", None)
        world = self._trainer.world_size if self._trainer is not None else 1
        if states is not None and states.shape[0] == world:
            self.__dict__["_pending_generator_state"] = states[self.global_rank].clone()
        elif states is not None:
            # Resumed on another number of devices: fresh per-rank streams, offset by the step.
            self.train_seed += int(checkpoint.get("global_step", 0))
        state = checkpoint.get("ddpm_t_sampler")
        if state is not None and isinstance(self.t_sampler, LossSecondMomentSampler):
            self.t_sampler.load_state_dict({k: v.numpy() for k, v in state.items()})
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        rng = checkpoint.get(RNG_KEY)
        if fitting and rng is not None:
            if all(v.shape[0] == world for v in rng.values()):
                states = {k: v[self.global_rank].clone() for k, v in rng.items()}
                set_rng_states(states, self._trainer.strategy.root_device)
                # Lightning then creates a train-loader iterator (drawing from the global RNG).
                # It is used when the checkpoint was written mid-epoch or at the last batch's end;
                # when Lightning instead finishes the epoch and starts a new one (checkpoint written
                # at the validation after the last batch), the state is applied again in
                # on_train_epoch_start, before that epoch's iterator.
                self.__dict__["_pending_rng"] = states
            else:
                rank_zero_warn(
                    f"the checkpoint's RNG states are from {next(iter(rng.values())).shape[0]} "
                    f"processes, this run has {world}: dropout and data order continue from "
                    "fresh streams (training itself resumes normally)."
                )

    def on_train_epoch_start(self) -> None:
        states = self.__dict__.get("_pending_rng")
        if states is not None:
            set_rng_states(states, self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        states = self.__dict__.pop("_pending_rng", None)  # first batch after a resume
        if states is not None and batch_idx > 0:
            # Mid-epoch: the uninterrupted run drew nothing between this batch and the previous
            # one; the resumed run's loader iterator did. (The batch itself comes from a
            # restarted loader unless the data loader is resumable.)
            set_rng_states(states, self.device)
