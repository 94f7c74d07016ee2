"""Activation checkpointing (``model.checkpointing=true``): peak memory and step time, with and
without, for the large U-Net presets at small batches.

Per configuration, a fresh process builds the preset, runs a warm-up training step (noise,
forward, MSE, backward, fused Adam) and ``--steps`` timed ones; configurations alternate within
each of ``--rounds`` rounds. Columns:

  saved_MiB      bytes autograd keeps for the backward pass (``saved_tensors_hooks``, counted
                 on the meta device: exact, no compute); with checkpointing, each level's inputs
  peak_MiB       growth of memory during a step over the memory before it, with the model,
                 its gradients and the Adam state already allocated (activations and
                 temporaries). CPU: resident set, sampled every ms; CUDA: the allocator's peak
  step_s         wall-clock seconds per step (median over rounds)
  cpu_s          process CPU seconds per step (with ``--threads 1``: insensitive to other jobs)

    python bench/checkpointing.py                                  # CPU: celeba64 b4, lsun256 b1
    python bench/checkpointing.py --device cuda --batch-sizes 64 8 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Clock, machine, median, table, write_json  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(preset: str, checkpointing: bool, device: str | torch.device = "cpu"):
    from ddpm.nn import unet_preset

    torch.manual_seed(0)
    with torch.device(device):
        return unet_preset(preset, checkpointing=checkpointing).train()


def saved_mib(preset: str, checkpointing: bool, batch: int) -> float:
    """MiB autograd saves for the backward of one forward, counted on the meta device."""
    net = build(preset, checkpointing, "meta")
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    size, ch = net.image_size, net.in_channels
    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.empty(batch, ch, size, size), torch.zeros(batch, dtype=torch.long))
    return total / 2**20


def probe(args: argparse.Namespace) -> None:
    """Subprocess: peak memory of the first step and wall-clock of the next ``--steps``."""
    preset, ckpt = args.probe[0], args.probe[1] == "1"
    batch = int(args.probe[2])
    device = torch.device(args.device)
    net = build(preset, ckpt).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    size, ch = net.image_size, net.in_channels
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, ch, size, size, generator=g, device=device) * 2 - 1
    dtype = DTYPES[args.precision]

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = net(0.7 * x0 + 0.7 * noise, t)
        loss = (out.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: peaks are activations
        loss.backward()
        opt.step()

    for p in net.parameters():  # allocate gradients and the Adam state (a zero update)
        p.grad = torch.zeros_like(p)
    opt.step()
    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        base = top = _rss_bytes()
        done = threading.Event()

        def poll() -> None:
            nonlocal top
            while not done.is_set():
                top = max(top, _rss_bytes())
                time.sleep(0.001)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        step()
        done.set()
        thread.join()
        peak = max(top, _rss_bytes()) - base
    with Clock(device) as c:
        for _ in range(args.steps):
            step()
    print(
        json.dumps(
            {"peak_mib": peak / 2**20, "step_s": c.wall / args.steps, "cpu_s": c.cpu / args.steps}
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", nargs="+", default=["celeba64", "lsun256"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 1], help="one per preset")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=1, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per configuration")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.add_argument(
        "--out", default=None, help="JSON path (default bench/results/checkpointing.json)"
    )
    p.add_argument("--probe", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return probe(args)
    if len(args.batch_sizes) != len(args.presets):
        p.error("--batch-sizes needs one batch size per preset")
    results: dict[tuple[str, bool], list[dict]] = {}
    for r in range(args.rounds):
        for preset, batch in zip(args.presets, args.batch_sizes):
            for ckpt in (False, True) if r % 2 == 0 else (True, False):
                cmd = [sys.executable, __file__, "--probe", preset, str(int(ckpt)), str(batch)]
                cmd += ["--device", args.device, "--precision", args.precision]
                cmd += ["--steps", str(args.steps), "--threads", str(torch.get_num_threads())]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results.setdefault((preset, ckpt), []).append(json.loads(out.splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for preset, batch in zip(args.presets, args.batch_sizes):
        for ckpt in (False, True):
            runs = results[preset, ckpt]
            rows.append(
                {
                    "preset": preset,
                    "batch": batch,
                    "checkpointing": ckpt,
                    "saved_MiB": saved_mib(preset, ckpt, batch),
                    "peak_MiB": runs[0]["peak_mib"],
                    "step_s": median([x["step_s"] for x in runs]),
                    "cpu_s": median([x["cpu_s"] for x in runs]),
                    "step_s_all": [x["step_s"] for x in runs],
                }
            )
        plain, ck = rows[-2], rows[-1]
        for row in (plain, ck):
            row["x_peak"] = row["peak_MiB"] / plain["peak_MiB"]
            row["x_time"] = row["step_s"] / plain["step_s"]
            row["x_cpu"] = row["cpu_s"] / plain["cpu_s"]
    print(
        f"{args.precision}, device {args.device}, threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    cols = [
        "preset",
        "batch",
        "checkpointing",
        "saved_MiB",
        "peak_MiB",
        "x_peak",
        "step_s",
        "x_time",
        "cpu_s",
        "x_cpu",
    ]
    print(table(rows, cols))
    payload = {"args": vars(args), "machine": machine(), "rows": rows}
    print(f"wrote {write_json('checkpointing', payload, args.out)}")


if __name__ == "__main__":
    main()
