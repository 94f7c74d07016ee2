"""NLL callback: finite bits/dim that fall as a tiny model trains on digits; the breakdown adds
up; the value does not depend on the number of processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ddpm.callbacks.ema import EMA
from ddpm.callbacks.nll import METRICS, NLLCallback
from ddpm.diffusion import calc_bpd_loop
from fit_utils import TinyEpsNet, digits, fit, make_module


class SmallEpsNet(nn.Module):
    """Three 3x3 convs with a timestep embedding: learns digits' noise well enough in 100 steps."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, hidden, 3, padding=1)
        self.emb = nn.Embedding(50, hidden)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.nn.functional.silu(self.inp(x) + self.emb(t)[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


def test_bits_per_dim_fall_as_a_tiny_model_trains_on_digits() -> None:
    torch.manual_seed(0)
    nll = NLLCallback(
        every_n_steps=40, num_images=16, batch_size=16, use_ema=False, at_train_end=False
    )
    t = fit(make_module(SmallEpsNet(), lr=5e-3), digits(batch_size=16), [nll], steps=120)
    steps = [s for s, _ in nll.history]
    assert steps == [40, 80, 120]
    for _, m in nll.history:
        assert set(m) == set(METRICS) and all(math.isfinite(v) for v in m.values())
        assert m["val/nll_bpd"] == pytest.approx(
            m["val/nll_prior_bpd"] + m["val/nll_decoder_bpd"] + m["val/nll_vb_bpd"], rel=1e-6
        )
        assert 0 < m["val/nll_prior_bpd"] < 0.05  # L_T is tiny for the linear schedule
    first, last = nll.history[0][1]["val/nll_bpd"], nll.history[-1][1]["val/nll_bpd"]
    assert last < first - 0.1, (first, last)  # about 6.5 -> 5.9 bits/dim
    assert float(t.callback_metrics["val/nll_bpd"]) == pytest.approx(last)


def test_matches_calc_bpd_loop_with_the_ema_network() -> None:
    torch.manual_seed(0)
    module = make_module(TinyEpsNet(), lr=2e-3)
    ema = EMA(decay=0.9)
    nll = NLLCallback(every_n_steps=3, num_images=20, batch_size=8)
    dm = digits()
    fit(module, dm, [ema, nll], steps=3)
    ((_, got),) = nll.history
    # by hand: chunks of 8 images, chunk k with noise from seed k, EMA network
    x = torch.cat([b for b in dm.val_dataloader()])[:20]
    totals = []
    for k, start in enumerate(range(0, 20, 8)):
        out = calc_bpd_loop(
            ema.ema_net,
            module.diffusion,
            x[start : start + 8],
            generator=torch.Generator().manual_seed(k),
        )
        totals.append(out["total_bpd"])
    assert got["val/nll_bpd"] == pytest.approx(float(torch.cat(totals).mean()), rel=1e-5)


def test_two_dimensional_data_disables_with_one_warning(recwarn: pytest.WarningsRecorder) -> None:
    from ddpm.data import ToyDataModule

    net = nn.Sequential(nn.Linear(2, 2))
    module = make_module(_PointNet(net), lr=2e-3)
    nll = NLLCallback(every_n_steps=1, num_images=8)
    fit(
        module, ToyDataModule(name="two_moons", n_train=64, n_val=16, batch_size=16), [nll], steps=2
    )
    assert nll.disabled and nll.history == []
    assert len([w for w in recwarn if "NLLCallback disabled" in str(w.message)]) == 1


class _PointNet(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x)


class DumpNLL(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, NLLCallback))
        torch.save(cb.history, Path(self.out) / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_same_value_on_one_and_two_processes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyEpsNet()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    single = NLLCallback(every_n_steps=1, num_images=24, batch_size=8, use_ema=False)
    # lr 0: the weights stay the same, so 1 and 2 processes evaluate the same network
    fit(make_module(net, lr=0.0), digits(), [single], steps=1)

    net2 = TinyEpsNet()
    net2.load_state_dict(init)
    double = NLLCallback(every_n_steps=1, num_images=24, batch_size=8, use_ema=False)
    fit(
        make_module(net2, lr=0.0),
        digits(),
        [double, DumpNLL(str(tmp_path))],
        steps=1,
        devices=2,
        strategy="ddp_spawn",
    )
    h0, h1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for h in (h0, h1):
        for k, v in single.history[0][1].items():
            assert h[0][1][k] == pytest.approx(v, rel=1e-6), k
