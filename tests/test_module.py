"""The LightningModule as Lightning users load it: ``DiffusionModule.load_from_checkpoint``."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ddpm.checkpoint import CONFIG_KEY, CheckpointError
from ddpm.module import DiffusionModule
from fit_utils import digits


def test_load_from_checkpoint_rebuilds_the_run_from_its_stored_config(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    module = DiffusionModule.load_from_checkpoint(tiny_ckpt)
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    saved = ckpt["state_dict"]
    assert module.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())
    assert module.run_config == ckpt[CONFIG_KEY] and module.diffusion.num_timesteps == 50
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 1e-3
    # what Lightning users do next: validate it (or fit it further) with a Trainer
    trainer = pl.Trainer(accelerator="cpu", logger=False, limit_val_batches=1)
    (metrics,) = trainer.validate(module, datamodule=digits(16), verbose=False)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    # data, never code: a stored config naming a foreign class is refused before anything runs
    ckpt[CONFIG_KEY]["optimizer"]["_target_"] = "os.system"
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"names .os.system., which is not ours at optimizer._target_"):
        DiffusionModule.load_from_checkpoint(tmp_path / "bad.ckpt")
