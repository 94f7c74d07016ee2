"""Test-only callback: each rank dumps its network (and EMA) weights at the end of fit."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


class RankWeightDump(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            f"net.{k}": v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()
        }
        ema = pl_module.denoiser(use_ema=True)
        if ema is not pl_module.net:
            state.update(
                {f"ema.{k}": v.detach().cpu().clone() for k, v in ema.state_dict().items()}
            )
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")
