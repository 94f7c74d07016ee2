"""Where one training step's time goes: torch.profiler, grouped by op kind, ours vs diffusers.

One training step (noise, forward, MSE loss, backward, Adam) of our ``cifar10`` U-Net and of
diffusers' ``UNet2DModel`` with the same configuration (``bench/_common.py``), each with its own
optimizer as in ``train_throughput.py`` (ours: fused Adam, diffusers: foreach Adam). The
profiler records ``--steps`` steps per model, models interleaved over ``--rounds`` rounds; every
op's *self* time (CPU: wall time on the calling thread; CUDA: kernel time) is put into one
group:

  conv          convolutions and their backward (oneDNN / cuDNN)
  matmul_attn   linear / matmul / bmm and scaled-dot-product attention (+ backward)
  groupnorm     GroupNorm forward and backward
  elementwise   SiLU, add, mul, dropout, loss, resampling (interpolate / pool) and other math
  copy_cast     copies, dtype casts, layout changes, concatenation, allocation, zero-fill
  optimizer     everything under ``optimizer.step`` / ``zero_grad``
  autograd      the autograd engine's own bookkeeping (node wrappers, AccumulateGrad, views)
  python        time of the step outside any op (Python, module calls, dispatch; CPU only)

The table shows ms per step by group for both models, their ratio and each group's share of
the step. Wall-clock img/s of both models is measured without the profiler in the same
interleaved rounds (the profiler adds per-op overhead to many-small-op models).

    python bench/profile_step.py                                # CPU, fp32, batch 8
    python bench/profile_step.py --precision bf16
    python bench/profile_step.py --device cuda --batch-size 128 --precision bf16
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS, Clock, machine, median, table, write_json  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
GROUPS = [
    "conv",
    "matmul_attn",
    "groupnorm",
    "elementwise",
    "copy_cast",
    "optimizer",
    "autograd",
    "python",
]
_RULES = [  # first match wins; matched against the op name in lower case
    ("optimizer", r"adam|foreach|optimizer"),
    ("conv", r"conv"),
    ("matmul_attn", r"addmm|\bmm\b|::mm|bmm|matmul|linear|attention|flash|sdpa|_efficient"),
    ("groupnorm", r"group_norm|groupnorm"),
    (
        "copy_cast",
        r"copy|_to_copy|::to$|contiguous|clone|\bcat\b|::cat|empty|zero|fill|"
        r"as_strided|resize|stack|format",
    ),
    (
        "autograd",
        r"autograd::|accumulategrad|backward0$|backward1$|::view|reshape|permute|transpose|"
        r"unflatten|unbind|chunk|split|select|slice|expand|squeeze|unsqueeze|detach|alias|"
        r"unsafe_view|_reshape_alias|set_|::t$",
    ),
]


def group_of(name: str) -> str:
    n = name.lower()
    for group, pattern in _RULES:
        if re.search(pattern, n):
            return group
    return "elementwise"


def make_step(name: str, precision: str, args: argparse.Namespace, device: torch.device):
    """One training step of ``name`` as a closure (what ``train_throughput.py`` times)."""
    torch.manual_seed(0)
    net = MODELS[name](args.image_size, args.channels).to(device).train()
    kind = {"fused": True} if name == "ours" else {"foreach": True}
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, **kind)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    x0 = torch.rand(shape, generator=g, device=device) * 2 - 1
    dtype = DTYPES[precision]

    def step() -> None:
        with record_function("train_step"):
            _step()

    def _step() -> None:
        t = torch.randint(0, 1000, (args.batch_size,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        x_t = 0.7 * x0 + 0.7 * noise
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = net(x_t, t)
        loss = (out.float() - noise).pow(2).mean()
        with record_function("optimizer.zero_grad"):
            opt.zero_grad(set_to_none=True)
        loss.backward()
        with record_function("optimizer.step"):
            opt.step()

    return step


def _in_optimizer(evt) -> bool:
    while evt is not None:
        if evt.name.startswith("optimizer.") or evt.name.startswith("Optimizer."):
            return True
        evt = evt.cpu_parent
    return False


def grouped_ms(prof, steps: int, device: torch.device) -> dict[str, float]:
    """ms per step by group: self CPU time of every op (CUDA: self device time)."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if device.type == "cuda" and (
            evt.device_type != DeviceType.CPU or evt.name in ("train_step", "optimizer.step")
        ):
            continue  # kernels count through the CPU op that launched them (no double count)
        us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if not us:
            continue
        if evt.name == "train_step":
            group = "python"
        elif _in_optimizer(evt):
            group = "optimizer"
        else:
            group = group_of(evt.name)
        out[group] += us / 1000 / steps
    return dict(out)


def top_ops(prof, device: torch.device, steps: int, n: int) -> list[dict]:
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    avgs = sorted(prof.key_averages(), key=lambda a: getattr(a, key), reverse=True)[:n]
    return [
        {
            "op": a.key,
            "group": "python" if a.key == "train_step" else group_of(a.key),
            "ms_step": getattr(a, key) / 1000 / steps,
            "calls_step": a.count / steps,
        }
        for a in avgs
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="profiled steps per model per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--top", type=int, default=12, help="also list the top-N ops of each model")
    p.add_argument("--models", nargs=2, default=["ours", "diffusers"], choices=list(MODELS))
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/profile.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)

    steps = {m: make_step(m, args.precision, args, device) for m in args.models}
    for s in steps.values():  # warm-up: allocator, oneDNN primitive caches, optimizer state
        s()
        s()
    groups: dict[str, list[dict[str, float]]] = {m: [] for m in args.models}
    wall: dict[str, list[float]] = {m: [] for m in args.models}
    profs = {}
    for r in range(args.rounds):
        order = args.models if r % 2 == 0 else args.models[::-1]
        for m in order:  # unprofiled wall-clock
            with Clock(device) as c:
                for _ in range(args.steps):
                    steps[m]()
            wall[m].append(c.wall / args.steps)
        for m in order:
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    steps[m]()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            groups[m].append(grouped_ms(prof, args.steps, device))
            profs[m] = prof
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    a, b = args.models
    med = {m: {g: median([d.get(g, 0.0) for d in groups[m]]) for g in GROUPS} for m in args.models}
    rows = []
    for g in GROUPS + ["total"]:
        va = sum(med[a].values()) if g == "total" else med[a][g]
        vb = sum(med[b].values()) if g == "total" else med[b][g]
        rows.append(
            {
                "group": g,
                f"{a}_ms": va,
                f"{a}_share": va / sum(med[a].values()),
                f"{b}_ms": vb,
                f"{b}_share": vb / sum(med[b].values()),
                f"{a}/{b}": va / vb if vb else float("nan"),
            }
        )
    img_s = {m: args.batch_size / median(wall[m]) for m in args.models}
    print(
        f"{args.precision}, batch {args.batch_size}, {args.image_size}x{args.image_size}x"
        f"{args.channels}, device {device}, threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds x {args.steps} steps (medians); ms per step"
    )
    print(table(rows, list(rows[0])))
    print(
        f"\nunprofiled wall-clock: {a} {img_s[a]:.3g} img/s, {b} {img_s[b]:.3g} img/s, "
        f"{a}/{b} = {img_s[a] / img_s[b]:.3f}"
    )
    tops = {m: top_ops(profs[m], device, args.steps, args.top) for m in args.models}
    for m in args.models:
        print(f"\ntop ops of {m} (last round):")
        print(table(tops[m], ["op", "group", "ms_step", "calls_step"]))
    payload = {
        "args": vars(args),
        "machine": machine(),
        "rows": rows,
        "img_s": img_s,
        "wall_s_all": wall,
        "groups_all": groups,
        "top_ops": tops,
    }
    print(f"wrote {write_json(f'profile_{args.precision}', payload, args.out)}")


if __name__ == "__main__":
    main()
