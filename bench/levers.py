"""The performance levers tried on the CIFAR-10 U-Net, each measured against the same baseline.

1. Adam update of the 35.7M parameters: ``foreach=True`` vs ``fused=True`` (ms per step).
2. Training img/s (fwd + bwd + Adam, batch 8, 32x32x3) in interleaved rounds of: diffusers'
   UNet2DModel, ours (foreach Adam), ours + fused Adam (the shipped default), + dropout drawn with
   ``rand_like`` instead of ``bernoulli_``, + GroupNorm run in the autocast dtype, ours + fused
   Adam with torch's mixed-dtype GroupNorm kernel under autocast (``mixed_gn``: our GroupNorm
   before 2026-12-06), ours + fused Adam with NCHW-contiguous conv weights (``w_nchw``), and
   with ``--compile`` ours under ``torch.compile`` (its compile time is printed separately).
   Wall-clock img/s and CPU-time img/s (per process-CPU-second times the threads: use
   ``--threads 1`` on a shared machine).

    python bench/levers.py --precision bf16
    python bench/levers.py --precision bf16 --threads 1 --rounds 4
    python bench/levers.py --precision bf16 --compile --rounds 3
    python bench/levers.py --precision bf16 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddpm.nn.unet as U  # noqa: E402
from _common import MODELS, machine, median, sync, table, write_json  # noqa: E402

B = 8


class AutocastDtypeGroupNorm(nn.GroupNorm):
    """GroupNorm in the input's dtype under autocast (autocast would run it in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
                return F.group_norm(x, self.num_groups, w, b, self.eps)
        return super().forward(x)


class RandDropout(nn.Module):
    """Dropout with a mask from ``rand_like`` (same distribution as ``nn.Dropout``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))


def build(name: str, levers: set[str], device: torch.device = torch.device("cpu")):
    torch.manual_seed(0)
    make_norm = U._group_norm
    if "gn_dtype" in levers:
        U._group_norm = lambda c, g: AutocastDtypeGroupNorm(g, c)
    try:
        net = MODELS[name](32, 3).to(device).train()
    finally:
        U._group_norm = make_norm
    if "rand_dropout" in levers:
        for m in net.modules():
            if isinstance(m, U.ResBlock) and isinstance(m.dropout, nn.Dropout):
                m.dropout = RandDropout(m.dropout.p)
    if "mixed_gn" in levers:  # torch's GroupNorm: the mixed-dtype kernel under CPU autocast
        for m in net.modules():
            if isinstance(m, U.GroupNorm):
                m.__class__ = nn.GroupNorm
    if "w_nchw" in levers:  # conv weights NCHW-contiguous (activations stay channels_last)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous()
    kind = {"fused": True} if "fused" in levers else {"foreach": True}
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, **kind)
    fwd = torch.compile(net) if "compile" in levers else net
    return fwd, opt, torch.rand(B, 3, 32, 32, device=device) * 2 - 1


def step(net, opt, x0: torch.Tensor, dtype: torch.dtype | None) -> None:
    t = torch.randint(0, 1000, (B,), device=x0.device)
    noise = torch.randn_like(x0)
    x = 0.7 * x0 + 0.7 * noise
    with torch.autocast(x0.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = net(x, t)
        out = out.sample if hasattr(out, "sample") else out
    loss = (out.float() - noise).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def adam_ms(device: torch.device, repeats: int = 5) -> dict[str, float]:
    params = list(MODELS["ours"](32, 3).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for kind in ("foreach", "fused"):
        opt = torch.optim.Adam(params, lr=2e-4, **{kind: True})
        opt.step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        sync(device)
        out[kind] = 1000 * (time.perf_counter() - t0) / repeats
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    device = torch.device(args.device)
    adam = adam_ms(device)
    print(
        f"Adam step, 35.7M params: foreach {adam['foreach']:.1f} ms, fused {adam['fused']:.1f} ms"
    )

    configs = [
        ("diffusers", ()),
        ("ours", ()),
        ("ours", ("fused",)),
        ("ours", ("fused", "rand_dropout")),
        ("ours", ("fused", "rand_dropout", "gn_dtype")),
        ("ours", ("fused", "mixed_gn")),
        ("ours", ("fused", "w_nchw")),
    ]
    if args.compile:
        configs.append(("ours", ("fused", "compile")))
    built = {c: build(c[0], set(c[1]), device) for c in configs}
    for c, (net, opt, x0) in built.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        step(net, opt, x0, dtype)
        if "compile" in c[1]:
            print(f"torch.compile: first step {time.perf_counter() - t0:.0f} s")
    img_s: dict[tuple, list[float]] = {c: [] for c in configs}
    img_cpu: dict[tuple, list[float]] = {c: [] for c in configs}
    threads = torch.get_num_threads()
    for r in range(args.rounds):
        items = list(built.items())
        for c, (net, opt, x0) in items if r % 2 == 0 else items[::-1]:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step(net, opt, x0, dtype)
            step(net, opt, x0, dtype)
            sync(device)
            img_s[c].append(2 * B / (time.perf_counter() - t0))
            img_cpu[c].append(2 * B / (time.process_time() - c0) * threads)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    base = median(img_s[("diffusers", ())])
    base_cpu = median(img_cpu[("diffusers", ())])
    rows = [
        {
            "model": name,
            "levers": "+".join(levers) or "-",
            "img_s_median": median(v),
            "x_diffusers": median(v) / base,
            "img_per_cpu_s": median(img_cpu[name, levers]),
            "x_diffusers_cpu": median(img_cpu[name, levers]) / base_cpu,
            "img_per_cpu_s_rounds": " ".join(f"{x:.2f}" for x in img_cpu[name, levers]),
        }
        for (name, levers), v in img_s.items()
    ]
    print(f"\n{args.precision}, batch {B}, {args.rounds} rounds, threads {args.threads}")
    print(table(rows, list(rows[0])))
    payload = {"machine": machine(), "args": vars(args), "adam_ms": adam, "rows": rows}
    print(write_json(f"levers_{args.precision}", payload, args.out))


if __name__ == "__main__":
    main()
