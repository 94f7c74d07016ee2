"""Exponential moving average of the network weights (DDPM: decay 0.9999; Ho et al. 2020, App. B).

Built on Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging` (torch's
:class:`~torch.optim.swa_utils.AveragedModel` underneath), keeping its once-per-optimizer-step
update rule (``trainer.global_step > _latest_update_step``), but:

* only ``pl_module.net`` is averaged (parameters and buffers), into a float32 copy on the model's
  device, whatever the training precision;
* the EMA weights are never swapped into the model (neither for validation nor at the end of
  training): :class:`~ddpm.module.DiffusionModule` evaluates both ``net`` and :attr:`EMA.ema_net`
  (:func:`ddpm.contracts.find_ema` finds it);
* checkpoints keep the raw weights in ``state_dict`` and add ``ema_state_dict`` (the EMA network's
  weights, keys of ``net``) and ``ema_state`` (update counters; :mod:`ddpm.checkpoint` names the
  keys), so a resumed run continues the average exactly.

Under DDP every rank updates its own copy from the already-synchronised weights after each
optimizer step, so the copies stay identical without any communication. The copy made in
``setup`` (before DDP wraps the module) is harmless: the first update overwrites it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ddpm.checkpoint import EMA_KEY, EMA_STATE_KEY
from ddpm.utils.posthoc_ema import check_sigma_rel, power_ema_beta, sigma_rel_to_gamma


def warmup_decay(decay: float, num_updates: int) -> float:
    """min(decay, (1 + n) / (10 + n)): the averaging horizon grows with the number of updates n
    (TensorFlow's ``ExponentialMovingAverage(num_updates=n)``)."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def half_life_decay(images_per_update: float, half_life_kimg: float) -> float:
    """EDM-style decay β = 0.5 ** (images per update / (half_life_kimg * 1000)): the EMA weight of
    a snapshot halves every ``half_life_kimg`` thousand training images."""
    return 0.5 ** (images_per_update / (half_life_kimg * 1000.0))


def _batch_len(batch: Any) -> int:
    """Number of samples in a (possibly nested) training batch."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    return 0


class _EMAModel(AveragedModel):
    """``AveragedModel`` whose copy is float32 and whose update casts the source tensors to it.

    torch's ``update_parameters`` groups (EMA, model) tensor pairs by device *and* dtype for the
    foreach kernels, which fails when the model is half precision and the EMA float32. The update
    here is the same (first call copies, later calls apply ``multi_avg_fn``), with a Python-side
    update counter so no host sync is needed to decide whether to copy.
    """

    def __init__(self, model: nn.Module, device: torch.device | None, multi_avg_fn: Any) -> None:
        super().__init__(model, device=device, multi_avg_fn=multi_avg_fn, use_buffers=True)
        self.module.float()  # floating-point params/buffers only; integer buffers keep their dtype
        self.module.requires_grad_(False)
        self.module.eval()
        self.num_updates = 0  # == int(self.n_averaged), without reading the device buffer

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        ema = [t.detach() for t in itertools.chain(self.module.parameters(), self.module.buffers())]
        src = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if len(ema) != len(src):
            raise RuntimeError(
                f"EMA: the network has {len(src)} parameters+buffers but its EMA copy "
                f"{len(ema)}; was the network changed after the EMA copy was made?"
            )
        src = [s.to(device=e.device, dtype=e.dtype) for e, s in zip(ema, src)]
        return ema, src

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Overwrite the EMA with ``model``'s weights (counters unchanged)."""
        ema, src = self._pairs(model)
        torch._foreach_copy_(ema, src)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        ema, src = self._pairs(model)
        if self.num_updates == 0:
            torch._foreach_copy_(ema, src)
        else:
            self.multi_avg_fn(ema, src, self.n_averaged)
        self.n_averaged += 1
        self.num_updates += 1

    def set_num_updates(self, n: int) -> None:
        self.num_updates = int(n)
        self.n_averaged.fill_(int(n))


class EMA(WeightAveraging):
    """EMA of ``pl_module.net``: ``ema = β ema + (1 - β) net`` after every ``update_every``-th
    optimizer step from ``start_step`` on; the first update copies the weights.

    The decay β of an update is ``decay`` (DDPM: 0.9999), or with ``half_life_kimg`` the EDM form
    0.5 ** (images since the last update / (half_life_kimg * 1000)), where the images since the
    last update are counted over all devices (= global batch x accumulation x ``update_every``).
    With ``warmup`` β is capped by (1 + n) / (10 + n), n = number of EMA updates so far, so short
    runs get a useful average (after 3000 updates β <= 0.997). With ``sigma_rel`` the average is
    EDM2's power-function EMA of that relative length (Karras et al. 2024, eq. 3-4): β = (1 -
    1/(n+1))^(γ+1), an average over the last ~σ_rel-fraction of the run whatever its length
    (``decay`` and ``warmup`` then unused).

    Before ``start_step`` the EMA just follows the weights (copied every step), and the counter n
    starts at ``start_step``.

    Args:
        decay: β per update, in (0, 1).
        warmup: cap β by (1 + n) / (10 + n).
        half_life_kimg: if set, β from this half-life in thousands of images (overrides ``decay``).
        sigma_rel: if set, EDM2's power-function EMA of this relative length (overrides
            ``decay`` and ``warmup``; not with ``half_life_kimg``).
        update_every: update every N optimizer steps.
        start_step: first optimizer step (0-based) that updates the EMA.
        device: where to keep the EMA copy (default: the model's device).
        log_decay: log the current β as ``train/ema_decay``.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        half_life_kimg: float | None = None,
        update_every: int = 1,
        start_step: int = 0,
        device: torch.device | str | None = None,
        log_decay: bool = True,
        sigma_rel: float | None = None,
    ) -> None:
        if not (isinstance(decay, (int, float)) and 0.0 < decay < 1.0):
            raise ValueError(f"decay must be a number in (0, 1), got {decay!r}")
        if half_life_kimg is not None and not (
            isinstance(half_life_kimg, (int, float))
            and half_life_kimg > 0
            and math.isfinite(half_life_kimg)
        ):
            raise ValueError(f"half_life_kimg must be null or a number > 0, got {half_life_kimg!r}")
        if sigma_rel is not None:
            check_sigma_rel(sigma_rel)
            if half_life_kimg is not None:
                raise ValueError(
                    "set one EMA length: sigma_rel (power-function EMA) or half_life_kimg, "
                    f"not both (got {sigma_rel!r} and {half_life_kimg!r})"
                )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
        super().__init__(device=device, use_buffers=True)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.half_life_kimg = None if half_life_kimg is None else float(half_life_kimg)
        self.sigma_rel = None if sigma_rel is None else float(sigma_rel)
        self._gamma = None if sigma_rel is None else sigma_rel_to_gamma(sigma_rel)
        self.update_every = int(update_every)
        self.start_step = int(start_step)
        self.log_decay = bool(log_decay)
        self._images_since_update = 0
        self._next_decay = self.decay
        self.last_decay: float | None = None  # β of the most recent averaging update
        self._source: nn.Module | None = None

    # ------------------------------------------------------------------ public API
    @property
    def ema_net(self) -> nn.Module | None:
        """The averaged network (eval mode, no grad; same class and keys as ``net``), or None
        before ``fit`` set it up."""
        return None if self._average_model is None else self._average_model.module

    @property
    def num_updates(self) -> int:
        """Number of EMA updates so far (``n_averaged``)."""
        return 0 if self._average_model is None else self._average_model.num_updates

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA network's weights (keys of ``net``) as detached clones on the EMA's device."""
        if self.ema_net is None:
            raise RuntimeError("EMA has no averaged network yet (it is created when fit starts)")
        return {k: v.detach().clone() for k, v in self.ema_net.state_dict().items()}

    def decay_at(self, num_updates: int, images_per_update: float | None = None) -> float:
        """β of the update that follows ``num_updates`` earlier updates."""
        if self._gamma is not None:
            return power_ema_beta(self._gamma, num_updates + 1)
        if self.half_life_kimg is not None:
            if images_per_update is None:
                raise ValueError("half_life_kimg needs the number of images per update")
            beta = half_life_decay(images_per_update, self.half_life_kimg)
        else:
            beta = self.decay
        return warmup_decay(beta, num_updates) if self.warmup else beta

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after optimizer step ``step_idx`` (0-based) if it is ``start_step``,
        ``start_step + update_every``, ...; never at epoch ends."""
        if step_idx is None or step_idx < self.start_step:
            return False
        return (step_idx - self.start_step) % self.update_every == 0

    # ------------------------------------------------------------------ averaging
    def _multi_avg_fn(self, ema: list[Tensor], model: list[Tensor], n_averaged: Tensor) -> None:
        """ema <- β ema + (1 - β) model for floating tensors; integer buffers are copied."""
        beta = self._next_decay
        fl = [(e, m) for e, m in zip(ema, model) if e.is_floating_point()]
        other = [(e, m) for e, m in zip(ema, model) if not e.is_floating_point()]
        if fl:
            e_fl, m_fl = (list(t) for t in zip(*fl))
            torch._foreach_lerp_(e_fl, m_fl, 1.0 - beta)
        for e, m in other:
            e.copy_(m)

    def _make_average_model(self, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        device = self._device if self._device is not None else pl_module.device
        self._average_model = _EMAModel(net, device=device, multi_avg_fn=self._multi_avg_fn)
        self._source = net

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(getattr(pl_module, "net", None), nn.Module):
            raise ValueError("EMA needs a LightningModule with a `net` nn.Module attribute")
        # A second fit() of the same module with the same callback continues the average.
        if stage == "fit" and (self._average_model is None or self._source is not pl_module.net):
            self._make_average_model(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Follow the model if the strategy moved it after setup (and no device was forced).
        if self._average_model is not None and self._device is None:
            self._average_model.to(pl_module.device)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._average_model is None:
            return
        self._images_since_update += _batch_len(batch) * trainer.world_size
        step = trainer.global_step  # optimizer steps taken so far
        if step <= self._latest_update_step:  # gradient accumulation: no optimizer step yet
            return
        step_idx = step - 1
        if step_idx < self.start_step:
            self._average_model.copy_from(pl_module.net)
            self._latest_update_step = step
            self._images_since_update = 0
            return
        if not self.should_update(step_idx=step_idx):
            return
        n = self._average_model.num_updates
        self._next_decay = self.decay_at(n, self._images_since_update)
        self._average_model.update_parameters(pl_module.net)
        self.last_decay = self._next_decay if n > 0 else 0.0  # the first update copies
        self._latest_update_step = step
        self._images_since_update = 0
        if self.log_decay:
            pl_module.log("train/ema_decay", self.last_decay, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No per-epoch updates (the base class would average at epoch ends)."""

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No swap: the module evaluates ``net`` and ``ema_net`` itself."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No swap back (nothing was swapped)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the raw weights in the model; the EMA stays in :attr:`ema_net` and checkpoints."""

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "n_averaged": self.num_updates,
            "latest_update_step": int(self._latest_update_step),
            "images_since_update": int(self._images_since_update),
            "last_decay": self.last_decay,
            "decay": self.decay,
            "warmup": self.warmup,
            "half_life_kimg": self.half_life_kimg,
            "sigma_rel": self.sigma_rel,
            "update_every": self.update_every,
            "start_step": self.start_step,
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters live in the checkpoint's ``ema_state``; nothing under ``callbacks``."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`on_load_checkpoint`."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Add ``ema_state_dict`` and ``ema_state``; ``state_dict`` keeps the raw weights."""
        if self._average_model is None:
            return
        checkpoint[EMA_KEY] = self.ema_state_dict()
        checkpoint[EMA_STATE_KEY] = self._state()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the EMA weights and counters (also outside fit, e.g. ``trainer.validate``)."""
        weights = checkpoint.get(EMA_KEY)
        if weights is None:
            rank_zero_warn(
                "EMA: the checkpoint holds no 'ema_state_dict' (written without the EMA "
                "callback?); the EMA restarts from the loaded weights."
            )
            if self._average_model is not None:
                self._average_model.set_num_updates(0)
            return
        if self._average_model is None or self._source is not pl_module.net:
            self._make_average_model(pl_module)
        assert self._average_model is not None
        self._average_model.module.load_state_dict(weights, strict=True)
        state = checkpoint.get(EMA_STATE_KEY, {})
        n = state.get("n_averaged")
        if n is None:  # weights without counters: continue averaging from them
            n = 1
        self._average_model.set_num_updates(int(n))
        self._latest_update_step = int(
            state.get("latest_update_step", checkpoint.get("global_step", 0))
        )
        self._images_since_update = int(state.get("images_since_update", 0))
        self.last_decay = state.get("last_decay")
