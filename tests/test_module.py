"""The LightningModule as Lightning users load it: ``DiffusionModule.load_from_checkpoint``."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ddpm.checkpoint import CONFIG_KEY, CheckpointError
from ddpm.module import DiffusionModule
from ddpm.utils.seeding import seeded_generator, step_seed
from fit_utils import T, digits, make_module


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
    with pytest.raises(
        CheckpointError, match=r"names .os.system., which is not ours at optimizer._target_"
    ):
        DiffusionModule.load_from_checkpoint(tmp_path / "bad.ckpt")


def test_validation_losses_are_means_over_every_validation_sample() -> None:
    """val/loss and val/loss_q{i} (torchmetrics means) are the exact means of the per-sample
    losses over all validation samples, and over those whose t falls in quartile i: not a mean
    of per-batch means (a quartile's share differs from batch to batch)."""
    module = make_module(seed=0)
    dm = digits(batch_size=32)
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    losses, ts = [], []
    with torch.no_grad():
        for i, x0 in enumerate(dm.val_dataloader()):
            g = seeded_generator(step_seed(module.val_seed, 0, i), x0.device)
            t = torch.randint(0, T, x0.shape[:1], generator=g)
            noise = torch.randn(x0.shape, generator=g)
            losses.append(module.loss(module.net, module.diffusion, x0, t, noise)["loss"])
            ts.append(t)
    loss, t = torch.cat(losses).double(), torch.cat(ts)
    assert len(loss) == 180  # the held-out tenth of the digits, 5 x 32 + 20
    assert metrics["val/loss"] == pytest.approx(loss.mean().item(), rel=1e-5)
    quartile = t * 4 // T
    for i in range(4):
        expected = loss[quartile == i].mean().item()
        assert metrics[f"val/loss_q{i}"] == pytest.approx(expected, rel=1e-5), i
