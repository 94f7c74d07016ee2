"""Test-only callback: each rank dumps its network (and EMA) weights at the end of fit."""

from __future__ import annotations

import json
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


class LabelProbe(pl.Callback):
    """Each rank checks that the label of every training example it gets is the label its data
    set gives that image (found by its pixels), and dumps (checked, wrong, labels seen)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.checked, self.wrong, self.seen = 0, 0, set()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        dm = trainer.datamodule
        images = dm.dataset("train").data.flatten(1)  # uint8, in memory
        labels = dm.labels("train")
        x, y = batch
        u8 = ((x.detach().cpu() + 1.0) * 127.5).round().to(torch.uint8).flatten(1)
        for img, label in zip(u8, y.cpu()):
            same = (images == img).all(1)
            self.checked += 1
            self.wrong += int(int(label) not in labels[same].tolist())
            self.seen.add(int(label))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = {"checked": self.checked, "wrong": self.wrong, "seen": sorted(self.seen)}
        (self.out_dir / f"labels_rank{trainer.global_rank}.json").write_text(json.dumps(out))
