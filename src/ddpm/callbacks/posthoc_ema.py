"""Post-hoc EMA during training (EDM2, Karras et al. 2024, sec. 3): power-function EMA profiles of
``pl_module.net`` and periodic snapshots of them, from which an EMA of any length σ_rel is
reconstructed after training (:mod:`ddpm.utils.posthoc_ema`; ``sample.py`` / ``evaluate.py``
``ema_sigma_rel=...``; ``bench/ema_sweep.py`` sweeps lengths).

Every profile is updated once per optimizer step, on every rank (as :class:`~ddpm.callbacks.ema.EMA`),
with β_γ(t) = (1 - 1/t)^(γ+1), t = updates so far (EDM2 eq. 4). Every ``every_n_steps`` steps
rank 0 writes a snapshot file (all profiles) to ``dirpath``. Checkpoints hold the live profiles
and the list of snapshot files written so far (:data:`ddpm.checkpoint.POSTHOC_EMA_KEY`), so a
resumed run continues the profiles exactly and rewrites the later snapshots as the uninterrupted
run wrote them; a run resumed into another directory first copies the earlier snapshots there.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ddpm.checkpoint import POSTHOC_EMA_KEY
from ddpm.utils.posthoc_ema import (
    check_sigma_rel,
    power_ema_beta,
    sigma_rel_to_gamma,
    write_snapshot,
)


class PostHocEMA(pl.Callback):
    """Power-function EMA profiles of ``pl_module.net`` and their snapshots (module docstring).

    Args:
        sigma_rels: the profiles' relative widths (EDM2 tracks 0.05 and 0.10).
        every_n_steps: optimizer steps between snapshots.
        dirpath: where snapshot files go (``step_<step>.safetensors``); default
            ``<trainer.default_root_dir>/ema_snapshots``.
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 100,
        dirpath: str | None = None,
    ) -> None:
        if isinstance(sigma_rels, str) or not isinstance(sigma_rels, Sequence) or not sigma_rels:
            raise ValueError(f"sigma_rels must be a non-empty list of numbers, got {sigma_rels!r}")
        sigma_rels = [check_sigma_rel(s, "sigma_rels") for s in sigma_rels]
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must be distinct, got {sigma_rels!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.sigma_rels = sigma_rels
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.every_n_steps = every_n_steps
        self.dirpath = None if dirpath is None else str(dirpath)
        self.profiles: list[dict[str, Tensor]] | None = None
        self.num_updates = 0
        self.snapshots: list[dict[str, Any]] = []
        self._latest_update_step = 0
        self._source: nn.Module | None = None

    # ------------------------------------------------------------------ profiles
    def _start(self, net: nn.Module) -> None:
        """Profiles equal to ``net``'s weights (float32 copies), no update counted yet."""
        state = net.state_dict()
        self.profiles = [
            {
                k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                for k, v in state.items()
            }
            for _ in self.sigma_rels
        ]
        self._source = net

    @torch.no_grad()
    def _update(self, net: nn.Module) -> None:
        assert self.profiles is not None
        self.num_updates += 1
        src = net.state_dict()
        for gamma, profile in zip(self.gammas, self.profiles, strict=True):
            weight = 1.0 - power_ema_beta(gamma, self.num_updates)
            fl = [k for k, v in profile.items() if v.is_floating_point()]
            torch._foreach_lerp_(
                [profile[k] for k in fl],
                [src[k].detach().to(profile[k].dtype) for k in fl],
                weight,
            )
            for k, v in profile.items():
                if not v.is_floating_point():
                    v.copy_(src[k])

    def _snapshot(self, trainer: pl.Trainer, step: int) -> None:
        assert self.profiles is not None and self.dirpath is not None
        name = f"step_{step:07d}.safetensors"
        if trainer.is_global_zero:
            write_snapshot(
                Path(self.dirpath) / name, self.profiles, self.sigma_rels, step, self.num_updates
            )
        self.snapshots.append({"file": name, "step": step, "num_updates": self.num_updates})

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(getattr(pl_module, "net", None), nn.Module):
            raise ValueError("PostHocEMA needs a LightningModule with a `net` nn.Module attribute")
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "ema_snapshots")
        if stage == "fit" and (self.profiles is None or self._source is not pl_module.net):
            self._start(pl_module.net)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.profiles is not None:  # follow the model if the strategy moved it after setup
            self.profiles = [
                {k: v.to(pl_module.device) for k, v in p.items()} for p in self.profiles
            ]

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if self.profiles is None or step <= self._latest_update_step:
            return  # gradient accumulation: no optimizer step yet
        self._update(pl_module.net)
        self._latest_update_step = step
        if step % self.every_n_steps == 0:
            self._snapshot(trainer, step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything lives in the checkpoint's ``POSTHOC_EMA_KEY``; nothing under ``callbacks``."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`on_load_checkpoint`."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.profiles is None:
            return
        checkpoint[POSTHOC_EMA_KEY] = {
            "sigma_rels": list(self.sigma_rels),
            "every_n_steps": self.every_n_steps,
            "num_updates": self.num_updates,
            "latest_update_step": self._latest_update_step,
            "profiles": [{k: v.detach().clone() for k, v in p.items()} for p in self.profiles],
            "dirpath": self.dirpath,
            "snapshots": [dict(s) for s in self.snapshots],
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        record = checkpoint.get(POSTHOC_EMA_KEY)
        if record is None:
            rank_zero_warn(
                "PostHocEMA: the checkpoint holds no post-hoc EMA profiles (written without the "
                "callback?); the profiles start from the loaded weights."
            )
            return
        if [float(s) for s in record["sigma_rels"]] != self.sigma_rels:
            raise ValueError(
                f"PostHocEMA: the checkpoint tracks sigma_rels={record['sigma_rels']}, this run "
                f"{self.sigma_rels}: resume with the run's own callbacks.posthoc_ema.sigma_rels"
            )
        self._start(pl_module.net)
        assert self.profiles is not None
        for profile, stored in zip(self.profiles, record["profiles"], strict=True):
            for k, v in profile.items():
                v.copy_(stored[k])
        self.num_updates = int(record["num_updates"])
        self._latest_update_step = int(record["latest_update_step"])
        self.snapshots = [dict(s) for s in record["snapshots"]]
        self._copy_earlier_snapshots(trainer, Path(str(record["dirpath"])))

    def _copy_earlier_snapshots(self, trainer: pl.Trainer, source: Path) -> None:
        """A run resumed in another directory: the snapshots so far join the new run's."""
        if self.dirpath is None or not trainer.is_global_zero:
            return
        target = Path(self.dirpath)
        if source.resolve() == target.resolve():
            return
        for entry in self.snapshots:
            src, dst = source / entry["file"], target / entry["file"]
            if dst.exists():
                continue
            if not src.exists():
                rank_zero_warn(
                    f"PostHocEMA: snapshot {src} of the resumed run is missing; post-hoc EMA "
                    "of this run cannot be reconstructed (ema_sigma_rel) without it."
                )
                continue
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
