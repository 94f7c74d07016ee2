"""Training throughput (img/s of forward + backward + Adam step) of the DDPM CIFAR-10 U-Net.

Ours (``unet_preset("cifar10")``) against diffusers' ``UNet2DModel`` with the same configuration
and denoising-diffusion-pytorch's ``Unet(dim=64, dim_mults=(1, 2, 4, 8))`` (35.9M parameters),
in fp32 and under bf16 autocast. All configurations are timed in interleaved rounds in one
process (medians over rounds); FLOPs per step come from ``torch.utils.flop_counter``; the matmul
peak is measured in the same run, before every round, by wall-clock and by CPU time
(``*_cpu`` columns: per process-CPU-second times the threads; with ``--threads 1`` these are
insensitive to other jobs on the machine). Peak memory: CUDA allocator peak, or on CPU
the growth of the max RSS during training in a fresh subprocess per configuration.
``--compile`` adds each model under ``torch.compile`` (rows ``<model>+compile``: the network
compiled, loss and Adam eager, as ``compile=true`` trains); its first step, the compilation,
is timed apart (``compile_s``).

    python bench/train_throughput.py                       # CPU defaults: a few minutes
    python bench/train_throughput.py --models ours diffusers --precisions fp32 --threads 1 \
        --compile --no-memory                              # eager and compiled, CPU time
    python bench/train_throughput.py --recipe --threads 1 --steps 5   # default recipe, compile
    python bench/train_throughput.py --device cuda --batch-size 128 --steps 20
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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS, Clock, machine, matmul_peaks, median, table, write_json  # noqa: E402

FUSED = {"ours": {"fused": True}}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


COMPILED = "+compile"


def make_step(name: str, precision: str, args: argparse.Namespace, device: torch.device):
    """``name`` is a model of ``MODELS``, or one with ``+compile``: its network under
    ``torch.compile`` (inductor's defaults, as ``DiffusionModule(compile=True)``)."""
    torch.manual_seed(0)
    base = name.removesuffix(COMPILED)
    net = MODELS[base](args.image_size, args.channels).to(device).train()
    fwd = torch.compile(net) if name.endswith(COMPILED) else net
    # Each framework's own optimizer: ours is configured with fused Adam (conf/optimizer);
    # the peers' training scripts use torch's default (foreach) Adam/AdamW.
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, **FUSED.get(base, {"foreach": True}))
    g = torch.Generator(device=device).manual_seed(0)
    x0 = (
        torch.rand(
            args.batch_size,
            args.channels,
            args.image_size,
            args.image_size,
            generator=g,
            device=device,
        )
        * 2
        - 1
    )
    dtype = DTYPES[precision]

    def step() -> None:
        t = torch.randint(0, 1000, (args.batch_size,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        x_t = 0.7 * x0 + 0.7 * noise  # float32, as q_sample (schedule math stays float32)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = fwd(x_t, t)
        loss = (out.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return net, step


def recipe_step(compiled: bool, overrides: list[str]):
    """One optimizer step of the default recipe (``conf/train.yaml`` with ``overrides``), as
    ``python src/train.py`` takes it: a batch of its data, the module's timestep sampler, noise
    and loss, backward, the trainer's gradient-norm clipping, the configured optimizer; the
    network under ``torch.compile`` when ``compiled`` (``compile=true``)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import ddpm.hydra_setup  # noqa: F401 - resolvers, before composing
    from ddpm.module import DiffusionModule

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "logger=none"])
    torch.manual_seed(0)
    module = DiffusionModule.from_config(cfg).train()
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
    net = torch.compile(module.net) if compiled else module.net
    clip = cfg.trainer.gradient_clip_val
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        t, weights = module.timestep_sampler.sample(x0.shape[0], x0.device, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (module.loss(net, module.diffusion, x0, t, noise)["loss"] * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.net.parameters(), float(clip))
        opt.step()

    return module.net, step, x0.shape[0]


def recipe(args: argparse.Namespace) -> None:
    """``--recipe``: the default recipe's optimizer steps per second, eager vs compiled, in
    interleaved rounds; the compiled one's first step (compilation) timed apart."""
    steps, info = {}, {}
    for compiled in (False, True):
        _, step, batch = recipe_step(compiled, args.overrides)
        with Clock(torch.device("cpu")) as first:
            step()
        with Clock(torch.device("cpu")) as second:
            step()
        steps[compiled] = step
        info[compiled] = {"first_s": first.wall, "second_s": second.wall, "wall": [], "cpu": []}
    for r in range(args.repeats):
        for compiled in (False, True) if r % 2 == 0 else (True, False):
            with Clock(torch.device("cpu")) as c:
                for _ in range(args.steps):
                    steps[compiled]()
            info[compiled]["wall"].append(c.wall / args.steps)
            info[compiled]["cpu"].append(c.cpu / args.steps)
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    threads = torch.get_num_threads()
    rows = []
    for compiled, d in info.items():
        cpu_s = median(d["cpu"]) / threads
        rows.append(
            {
                "compile": compiled,
                "steps_s": 1 / median(d["wall"]),
                "steps_per_cpu_s": 1 / cpu_s,
                "img_per_cpu_s": batch / cpu_s,
                "first_step_s": d["first_s"],
                "compile_s": d["first_s"] - d["second_s"] if compiled else 0.0,
                "cpu_s_rounds": " ".join(f"{x:.3f}" for x in d["cpu"]),
            }
        )
    for row in rows:
        row["x_eager_cpu"] = row["steps_per_cpu_s"] / rows[0]["steps_per_cpu_s"]
    print(
        f"default recipe {args.overrides or ''}, batch {batch}, {args.repeats} rounds x "
        f"{args.steps} steps, threads {threads}"
    )
    print(table(rows, list(rows[0])))
    payload = {"args": vars(args), "machine": machine(), "rows": rows}
    print(f"wrote {write_json('train_recipe', payload, args.out)}")


def flops_per_step(step) -> float:
    with FlopCounterMode(display=False) as fc:
        step()
    return float(fc.get_total_flops())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(args: argparse.Namespace) -> None:
    """Subprocess: MiB of RSS growth over the built model's RSS during the first two training
    steps (activations, gradients, Adam state), sampled every millisecond by a thread. The
    first steps of a fresh process: the allocator has no freed memory to reuse yet."""
    device = torch.device(args.device)
    name, precision = args.memory_probe
    net, step = make_step(name, precision, args, device)
    base = peak = _rss_bytes()
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    for _ in range(2):
        step()
    done.set()
    thread.join()
    peak = max(peak, _rss_bytes())
    print(json.dumps({"peak_mib": (peak - base) / 2**20}))


def peak_memory(name: str, precision: str, args: argparse.Namespace, device: torch.device):
    if device.type == "cuda":
        net, step = make_step(name, precision, args, device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    cmd = [
        sys.executable,
        __file__,
        "--memory-probe",
        name,
        precision,
        "--batch-size",
        str(args.batch_size),
        "--image-size",
        str(args.image_size),
        "--channels",
        str(args.channels),
        "--device",
        args.device,
        "--threads",
        str(torch.get_num_threads()),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration per round")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--compile", action="store_true", help="also every model under torch.compile (+compile)"
    )
    p.add_argument(
        "--recipe",
        nargs="*",
        default=None,
        metavar="OVERRIDE",
        dest="overrides",
        help="instead: the default recipe (conf/train.yaml + overrides), eager vs compile=true",
    )
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train.json)")
    p.add_argument("--memory-probe", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)
    if args.overrides is not None:
        return recipe(args)
    device = torch.device(args.device)
    models = args.models + [m + COMPILED for m in args.models if args.compile]
    configs = [(m, pr) for pr in args.precisions for m in models]
    steps, info = {}, {}
    for m, pr in configs:
        net, step = make_step(m, pr, args, device)
        with Clock(device) as first:
            step()  # warm-up (allocator, oneDNN primitive caches; compilation)
        with Clock(device) as second:
            step()
        info[m, pr] = {
            "compile_s": first.wall - second.wall if m.endswith(COMPILED) else 0.0,
            "params": sum(q.numel() for q in net.parameters()),
            # counted eagerly: the same network and FLOPs, whatever inductor fuses
            "flops": flops_per_step(make_step(m.removesuffix(COMPILED), pr, args, device)[1]),
            "wall": [],
            "cpu": [],
        }
        steps[m, pr] = step
    peaks = {pr: [] for pr in args.precisions}
    cpu_peaks = {pr: [] for pr in args.precisions}
    for r in range(args.repeats):
        for pr in args.precisions:
            wall_peak, cpu_peak = matmul_peaks(device, DTYPES[pr] or torch.float32)
            peaks[pr].append(wall_peak)
            cpu_peaks[pr].append(cpu_peak)
        for key in configs if r % 2 == 0 else configs[::-1]:
            with Clock(device) as c:
                for _ in range(args.steps):
                    steps[key]()
            info[key]["wall"].append(c.wall / args.steps)
            info[key]["cpu"].append(c.cpu / args.steps)
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    rows = []
    threads = torch.get_num_threads()
    for m, pr in configs:
        d = info[m, pr]
        wall, cpu = median(d["wall"]), median(d["cpu"])
        gflops = d["flops"] / wall / 1e9
        peak = median(peaks[pr])
        gflops_cpu = d["flops"] / cpu * threads / 1e9
        cpu_peak = median(cpu_peaks[pr])
        rows.append(
            {
                "model": m,
                "precision": pr,
                "params_M": d["params"] / 1e6,
                "img_s": args.batch_size / wall,
                "img_per_cpu_s": args.batch_size / cpu * threads,
                "GFLOP_step": d["flops"] / 1e9,
                "GFLOP_s": gflops,
                "matmul_peak_GFLOP_s": peak,
                "frac_peak": gflops / peak,
                "GFLOP_per_cpu_s": gflops_cpu,
                "matmul_peak_cpu": cpu_peak,
                "frac_peak_cpu": gflops_cpu / cpu_peak,
                "compile_s": d["compile_s"],
                "wall_s_all": d["wall"],
                "cpu_s_all": d["cpu"],
            }
        )
    for row in rows:
        ref = next(
            (r for r in rows if r["model"] == "diffusers" and r["precision"] == row["precision"]),
            None,
        )
        if ref:
            row["x_diffusers"] = row["img_s"] / ref["img_s"]
            row["x_diffusers_cpu"] = row["img_per_cpu_s"] / ref["img_per_cpu_s"]
        compiled_ref = next(
            (
                r
                for r in rows
                if r["model"] == "diffusers" + COMPILED and r["precision"] == row["precision"]
            ),
            None,
        )
        if compiled_ref:
            row["x_diffusers_compiled_cpu"] = row["img_per_cpu_s"] / compiled_ref["img_per_cpu_s"]
    if not args.no_memory:
        for row in rows:
            row["peak_mem_MiB"] = peak_memory(row["model"], row["precision"], args, device)
    cols = [
        "model",
        "precision",
        "params_M",
        "img_s",
        "x_diffusers",
        "img_per_cpu_s",
        "x_diffusers_cpu",
        "x_diffusers_compiled_cpu",
        "GFLOP_step",
        "GFLOP_s",
        "matmul_peak_GFLOP_s",
        "frac_peak",
        "GFLOP_per_cpu_s",
        "matmul_peak_cpu",
        "frac_peak_cpu",
        "peak_mem_MiB",
        "compile_s",
    ]
    print(
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}x{args.channels}, "
        f"{args.repeats} rounds x {args.steps} steps, device {device}, threads {threads}"
    )
    if not args.compile:
        cols = [c for c in cols if c not in ("x_diffusers_compiled_cpu", "compile_s")]
    print(table(rows, cols))
    path = write_json("train", {"args": vars(args), "machine": machine(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
