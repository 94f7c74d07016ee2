"""EMA callback: closed form, warmup, half-life, accumulation, checkpoint round trip, validate, DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ddpm.callbacks.ema import EMA, half_life_decay, warmup_decay
from ddpm.checkpoint import EMA_KEY, net_state_dict
from fit_utils import TinyEpsNet, make_module, trainer


# ----------------------------------------------------------------------------------- fixtures
def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(123)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)


class WeightRecorder(pl.Callback):
    """Network weights after every optimizer step (once per step under accumulation)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.last = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.last:
            self.last = trainer.global_step
            self.weights.append(
                {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
            )


def expected_ema(weights: list[dict], ema: EMA, images_per_step: int) -> tuple[dict, int]:
    """The documented rule, by hand: follow the weights before start_step, copy at the first
    update, then ema = β ema + (1 - β) w with β = decay_at(n)."""
    avg: dict | None = None
    n = 0
    images = 0
    for step_idx, w in enumerate(weights):
        images += images_per_step
        if step_idx < ema.start_step:
            avg, images = dict(w), 0
            continue
        if (step_idx - ema.start_step) % ema.update_every:
            continue
        if n == 0:
            avg = dict(w)
        else:
            if ema.half_life_kimg is not None:
                beta = half_life_decay(images, ema.half_life_kimg)
            else:
                beta = ema.decay
            if ema.warmup:
                beta = min(beta, (1 + n) / (10 + n))
            avg = {
                k: (beta * avg[k] + (1 - beta) * w[k]) if w[k].is_floating_point() else w[k]
                for k in w
            }
        n += 1
        images = 0
    return avg, n


def assert_state_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=1e-5, msg=k)


# ----------------------------------------------------------------------------------- closed form
def test_warmup_and_half_life_formulas() -> None:
    assert warmup_decay(0.9999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9999, 3000) == pytest.approx(3001 / 3010)
    assert warmup_decay(0.9, 1000) == 0.9
    # β^(images per half-life) = 1/2
    beta = half_life_decay(images_per_update=128, half_life_kimg=10)
    assert beta ** (10_000 / 128) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="update_every"):
        EMA(update_every=0)
    with pytest.raises(ValueError, match="half_life_kimg"):
        EMA(half_life_kimg=-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(decay=0.9, warmup=False),
        dict(decay=0.99, warmup=True),
        dict(half_life_kimg=0.05, warmup=False),
        dict(decay=0.8, warmup=False, update_every=2, start_step=3),
    ],
    ids=["decay", "warmup", "half_life", "every2_start3"],
)
def test_ema_matches_closed_form(kwargs: dict) -> None:
    module = make_module(seed=0)
    ema, rec = EMA(**kwargs), WeightRecorder()
    steps = 10
    # validation every 3 steps: the EMA must not be swapped into the model and back
    trainer(
        steps, [rec, ema], limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None
    ).fit(module, loader(), loader())
    assert len(rec.weights) == steps
    expected, n = expected_ema(rec.weights, ema, images_per_step=8)
    assert ema.num_updates == n
    assert int(ema._average_model.n_averaged) == n
    assert_state_close(ema.ema_net.state_dict(), expected)
    # the model keeps its raw weights (no swap at validation / train end)
    assert_state_close(module.net.state_dict(), rec.weights[-1], atol=0)
    # EMA: float32, eval mode, no grad, and really different from the raw weights
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.ema_net.parameters())
    assert not ema.ema_net.training
    assert not torch.equal(ema.ema_net.conv1.weight, module.net.conv1.weight)
    assert module.denoiser(use_ema=True) is ema.ema_net


def test_once_per_optimizer_step_under_accumulation() -> None:
    module = make_module(seed=0)
    ema, rec = EMA(decay=0.9, warmup=False), WeightRecorder()
    trainer(5, [rec, ema], accumulate_grad_batches=4).fit(module, loader(n=64))
    assert ema.num_updates == 5  # 20 micro-batches, 5 optimizer steps
    expected, n = expected_ema(rec.weights, ema, images_per_step=32)
    assert n == 5
    assert_state_close(ema.ema_net.state_dict(), expected)


def test_half_life_counts_images_of_all_micro_batches() -> None:
    module = make_module(seed=0)
    ema = EMA(half_life_kimg=0.1, warmup=False)
    trainer(3, [ema], accumulate_grad_batches=2).fit(module, loader())
    assert ema.last_decay == pytest.approx(half_life_decay(16, 0.1))


def test_ema_is_float32_under_mixed_precision() -> None:
    module = make_module(seed=0)
    ema = EMA(decay=0.9)
    trainer(3, [ema], precision="bf16-mixed").fit(module, loader())
    assert all(p.dtype == torch.float32 for p in ema.ema_net.parameters())
    assert ema.num_updates == 3


def test_float32_average_of_a_bfloat16_network() -> None:
    from ddpm.callbacks.ema import _EMAModel

    ema = EMA(decay=0.5, warmup=False)
    net = TinyEpsNet()
    avg = _EMAModel(net, None, ema._multi_avg_fn)
    net.to(torch.bfloat16)  # what a "-true" half precision does to the model after setup
    w1 = {k: v.float() for k, v in net.state_dict().items()}
    avg.update_parameters(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update_parameters(net)
    for k, v in avg.module.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32
            w2 = net.state_dict()[k].float()
            torch.testing.assert_close(v, 0.5 * w1[k] + 0.5 * w2, msg=k)


# ----------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_resumes_exactly(tmp_path: Path) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, ckpt_dir: Path | None = None):
        module = make_module(seed=0)
        ema = EMA(decay=0.95, warmup=True)
        cbs: list = [ema]
        if ckpt_dir is not None:
            cbs.append(
                ModelCheckpoint(
                    dirpath=ckpt_dir,
                    every_n_train_steps=8,
                    save_top_k=-1,
                    filename="step{step}",
                    auto_insert_metric_name=False,
                )
            )
        trainer(max_steps, cbs, enable_checkpointing=ckpt_dir is not None).fit(
            module, loader(), ckpt_path=ckpt_path
        )
        return module, ema

    full_module, full_ema = run(16, ckpt_dir=tmp_path)
    ckpt_file = tmp_path / "step8.ckpt"
    ckpt = torch.load(ckpt_file, weights_only=True)
    # layout: raw weights under state_dict, EMA weights (net keys, no prefix) + counters
    net_keys = set(full_module.net.state_dict())
    assert set(ckpt[EMA_KEY]) == net_keys
    assert {k[len("net.") :] for k in ckpt["state_dict"]} == net_keys
    assert ckpt["ema_state"]["n_averaged"] == 8
    assert ckpt["ema_state"]["latest_update_step"] == 8
    assert not torch.equal(ckpt[EMA_KEY]["conv1.weight"], ckpt["state_dict"]["net.conv1.weight"])
    sd, used_ema = net_state_dict(ckpt, use_ema=True)
    assert used_ema and TinyEpsNet().load_state_dict(sd) is not None

    resumed_module, resumed_ema = run(16, ckpt_path=str(ckpt_file))
    assert resumed_ema.num_updates == full_ema.num_updates == 16
    assert_state_close(resumed_module.net.state_dict(), full_module.net.state_dict(), atol=1e-6)
    assert_state_close(resumed_ema.ema_net.state_dict(), full_ema.ema_net.state_dict(), atol=1e-6)


def test_validate_restores_ema_from_checkpoint(tmp_path: Path) -> None:
    module = make_module(seed=0)
    ema = EMA(decay=0.9)
    t = trainer(4, [ema])
    t.fit(module, loader())
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)

    fresh, fresh_ema = make_module(seed=1), EMA(decay=0.9)
    assert fresh_ema.ema_net is None
    v = trainer(1, [fresh_ema], limit_val_batches=2)
    metrics = v.validate(fresh, loader(), ckpt_path=str(path), verbose=False)[0]
    assert_state_close(fresh_ema.ema_net.state_dict(), ema.ema_net.state_dict(), atol=0)
    assert "val/loss_ema" in metrics and "val/loss" in metrics
    assert fresh_ema.num_updates == 4


def test_validate_without_fit_or_checkpoint_is_tolerated() -> None:
    module = make_module(seed=0)
    ema = EMA()
    metrics = trainer(1, [ema], limit_val_batches=1).validate(module, loader(), verbose=False)[0]
    assert ema.ema_net is None and "val/loss" in metrics and "val/loss_ema" not in metrics


def test_fast_dev_run(tmp_path: Path) -> None:
    module = make_module(seed=0)
    ema = EMA()
    pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        callbacks=[ema],
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    ).fit(module, loader(), loader())
    assert ema.num_updates == 1


# ----------------------------------------------------------------------------------- DDP
class RankDump(pl.Callback):
    """Every rank saves its per-step weights and its final EMA state."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.rec = WeightRecorder()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rec.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        torch.save(
            {
                "ema": ema.ema_state_dict(),
                "n": ema.num_updates,
                "weights": self.rec.weights,
                "images": 8 * trainer.world_size,
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_ddp_ema_identical_on_every_rank(tmp_path: Path) -> None:
    module = make_module(seed=0)
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}
    ema = EMA(decay=0.9, warmup=True)
    t = trainer(6, [ema, RankDump(str(tmp_path))], devices=2, strategy="ddp_spawn")
    t.fit(module, loader(n=64))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["n"] == r1["n"] == 6
    for k in r0["ema"]:
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    # updated from the synchronised (DDP-trained) weights, not frozen at the pre-wrap copy
    assert not torch.equal(r0["ema"]["conv1.weight"], initial["conv1.weight"])
    for w0, w1 in zip(r0["weights"], r1["weights"]):
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
    expected, n = expected_ema(r0["weights"], EMA(decay=0.9, warmup=True), r0["images"])
    assert n == 6
    assert_state_close(r0["ema"], expected)
