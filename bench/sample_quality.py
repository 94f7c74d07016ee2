"""Sample quality against network evaluations (NFE) for every sampler, on one trained checkpoint.

For a digits checkpoint of any objective (``python src/train.py``, or with ``objective=edm`` /
``objective=flow_matching``: the samplers run on the checkpoint's own process), every sampler
draws the same seeds at NFE in {5, 8, 10, 15, 20, 50, 100} and the samples are scored by the
repo's digit classifier (``digits_classifier.py``): Fréchet distance to the held-out digits in
the classifier's feature space (lower is better), mean confidence and number of classes. Heun
costs 2N - 1 evaluations for N steps (2N - 2 where sampling starts at α = 0, e.g. rectified flow:
its first step is Euler's), so it runs at the NFE at or below each target. The network calls of
every row are counted, reported as its NFE, and may not exceed the target's, on every process. On EDM's
process and rectified flow ``ddim`` is their Euler sampler (η = 0), and ``spacing=auto`` is the
process's own grid (EDM: Karras σ, so ``dpm_solver_2m_karras`` equals ``dpm_solver_2m`` there;
rectified flow: uniform in t). Prints Markdown tables, writes a JSON and a PNG (quality vs NFE).

    python src/train.py run_dir=outputs/sample_quality/digits_default
    python bench/sample_quality.py \\
        --ckpt outputs/sample_quality/digits_default/checkpoints/last.ckpt --num-samples 500
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json  # noqa: E402
from ddpm.checkpoint import load_model  # noqa: E402
from ddpm.diffusion import (  # noqa: E402
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    HeunSampler,
    UniPCSampler,
)
from ddpm.utils.seeding import PerSampleGenerator  # noqa: E402
from digits_classifier import ROOT, DigitsClassifier  # noqa: E402

NFES = (5, 8, 10, 15, 20, 50, 100)

# name: (NFE -> sampler, NFE it costs). Defaults of conf/sampler/* except the step count.
SAMPLERS: dict[str, Callable[[int], tuple[Any, int]]] = {
    "ddpm": lambda n: (DDPMSampler(steps=n), n),
    "ddim": lambda n: (DDIMSampler(steps=n), n),
    "dpm_solver_2m": lambda n: (DPMSolverSampler(steps=n), n),
    "dpm_solver_2m_karras": lambda n: (DPMSolverSampler(steps=n, spacing="karras"), n),
    "dpm_solver_3m": lambda n: (DPMSolverSampler(steps=n, order=3), n),
    "dpm_solver_sde": lambda n: (DPMSolverSampler(steps=n, algorithm_type="sde-dpmsolver++"), n),
    "unipc": lambda n: (UniPCSampler(steps=n), n),
    "unipc_3_bh1": lambda n: (UniPCSampler(steps=n, order=3, solver_type="bh1"), n),
    "heun": lambda n: (HeunSampler(steps=(n + 1) // 2), 2 * ((n + 1) // 2) - 1),
}


class CountingNet(torch.nn.Module):
    """The network, counting its calls (one per network evaluation of a batch)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.net(*args, **kwargs)


def generate(
    loaded: Any, sampler: Any, all_seeds: range, batch_size: int, device: torch.device
) -> tuple[Tensor, int]:
    """(samples in [0, 1], one per seed (independent of the batch size); network evaluations
    per sample)."""
    out, net, batches = [], CountingNet(loaded.net), 0
    for start in range(0, len(all_seeds), batch_size):
        seeds = all_seeds[start : start + batch_size]
        gen = PerSampleGenerator(seeds, device=device)
        shape = (len(seeds), *loaded.sample_shape)
        x = sampler(net, loaded.diffusion, shape, generator=gen, device=device)
        out.append(x.float().cpu())
        batches += 1
    return (torch.cat(out) + 1.0) / 2.0, net.calls // batches


def describe(loaded: Any) -> str:
    """The checkpoint's process and parameterisation, e.g. ``schedule=edm, prediction_type=edm``."""
    process = loaded.diffusion
    return f"schedule={process.schedule}, prediction_type={process.prediction_type}"


def plot(rows: list[dict[str, Any]], reference: dict[str, float], path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in SAMPLERS:
        pts = sorted(
            (r["nfe"], r["frechet"], r["confidence"]) for r in rows if r["sampler"] == name
        )
        if not pts:
            continue
        nfe, fd, conf = zip(*pts, strict=True)
        style = "--" if name.startswith(("ddpm", "ddim")) else "-"
        axes[0].plot(nfe, fd, style, marker="o", ms=3, label=name)
        axes[1].plot(nfe, conf, style, marker="o", ms=3, label=name)
    axes[0].axhline(reference["frechet"], color="gray", lw=0.8, ls=":", label="500 training digits")
    axes[1].axhline(
        reference["confidence"], color="gray", lw=0.8, ls=":", label="500 training digits"
    )
    for ax, ylabel in zip(
        axes,
        ("Fréchet distance (classifier features), lower is better", "mean confidence"),
        strict=True,
    ):
        ax.set_xscale("log")
        ax.set_xticks(NFES, [str(n) for n in NFES])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Sample quality vs NFE, digits, {what} (EMA weights)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a digits checkpoint (any objective)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--first-seed", type=int, default=0, help="sample i uses seed first-seed + i")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plot", default=None, help="PNG path (default: outputs/bench/...)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/...)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    plot_path = Path(args.plot or ROOT / "outputs" / "bench" / f"sample_quality_{stamp}.png")

    clf = DigitsClassifier.fit()
    loaded = load_model(args.ckpt, use_ema=True, device=device)
    n_real = min(args.num_samples, 1617)
    from ddpm.data import ImageDataModule

    real = ImageDataModule("digits", root=None).dataset("train").data[:n_real] / 255.0
    reference = clf.scores(real, frechet=True)
    print(f"checkpoint: {describe(loaded)}, step {loaded.global_step}", flush=True)
    print(f"classifier accuracy on the held-out digits: {clf.accuracy:.3f}", flush=True)
    print(f"{n_real} training digits: {reference}", flush=True)

    seeds = range(args.first_seed, args.first_seed + args.num_samples)
    rows = []
    for target in sorted(args.nfe):  # few-step rows first: a partial run is already useful
        for name in args.samplers:
            sampler, nfe = SAMPLERS[name](target)
            t0 = time.perf_counter()
            try:
                images, calls = generate(loaded, sampler, seeds, args.batch_size, device)
            except ValueError as e:  # e.g. a Karras grid with repeated timesteps
                print(f"{name} NFE {target}: skipped ({e})", flush=True)
                continue
            secs = time.perf_counter() - t0
            if calls > nfe:
                raise RuntimeError(f"{name} at NFE {nfe} called the network {calls} times")
            row = {"sampler": name, "target": target, "nfe": calls}
            row.update(clf.scores(images, frechet=True))
            row["seconds"] = round(secs, 1)
            rows.append(row)
            print(table([row], list(row)).splitlines()[-1], flush=True)

    cols = ["sampler", "nfe", "frechet", "confidence", "classes", "digits_IS", "seconds"]
    print(
        f"\n{args.num_samples} samples per row, seeds {seeds[0]}..{seeds[-1]}; checkpoint "
        f"{describe(loaded)}, step {loaded.global_step}\n"
    )
    rows.sort(key=lambda r: (args.samplers.index(r["sampler"]), r["nfe"]))
    print(table(rows, cols))
    pivot = []
    for name in args.samplers:
        mine = {r["target"]: r["frechet"] for r in rows if r["sampler"] == name}
        pivot.append({"sampler": name, **{str(n): mine.get(n, "") for n in args.nfe}})
    print("\nFréchet distance by NFE (Heun: the NFE at or below the column's)\n")
    print(table(pivot, ["sampler", *[str(n) for n in args.nfe]]))
    plot(rows, reference, plot_path, describe(loaded))
    print(f"\nplot: {plot_path}")
    payload = {
        "machine": machine(),
        "ckpt": str(args.ckpt),
        "global_step": loaded.global_step,
        "process": describe(loaded),
        "num_samples": args.num_samples,
        "first_seed": args.first_seed,
        "classifier_acc": clf.accuracy,
        "real_train_digits": reference,
        "rows": rows,
    }
    print(write_json(f"sample_quality_{stamp}", payload, args.out))


if __name__ == "__main__":
    main()
