"""Sample quality against EMA length, reconstructed post hoc (EDM2, Karras et al. 2024) from one
run's power-function EMA snapshots (``callbacks.posthoc_ema``), and the length chosen by
validation.

For each σ_rel the EMA is reconstructed (``ddpm.checkpoint.load_model(..., sigma_rel=...)``, the
path ``sample.py`` / ``evaluate.py ema_sigma_rel=...`` take), ``--num-samples`` samples are drawn
with DPM-Solver++(2M) at ``--nfe`` network evaluations and scored by the digit classifier: the
Fréchet distance to the held-out digits (``quality.py``'s measure) on the validation seeds
(``quality.VALIDATION_SEED`` on: never a reported seed set), which chooses the length, and on
the ``--seeds`` reported seed sets. The least-squares fit's relative error (0 = a tracked
profile) is printed beside each length. Prints a table and the chosen σ_rel, writes a PNG.

    python bench/ema_sweep.py --ckpt outputs/.../checkpoints/last.ckpt --plot bench/figures/ema_sweep.png
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json  # noqa: E402
from ddpm.checkpoint import POSTHOC_EMA_KEY, load_model, open_checkpoint  # noqa: E402
from ddpm.utils.posthoc_ema import sigma_rel_to_gamma, solve_coefficients  # noqa: E402
from quality import ROOT, VALIDATION_SEED, Scorer  # noqa: E402

SIGMA_RELS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25)


def fit_errors(ckpt: Path, sigma_rels: Sequence[float]) -> dict[float, float]:
    """Relative error of the least-squares fit of each length from the run's snapshots."""
    record = open_checkpoint(ckpt, mmap=True)[POSTHOC_EMA_KEY]
    gammas = [sigma_rel_to_gamma(s) for s in record["sigma_rels"]]
    t_end = int(record["num_updates"])
    ts = [int(e["num_updates"]) for e in record["snapshots"] if int(e["num_updates"]) < t_end]
    profiles = [(g, t) for t in [*ts, t_end] for g in gammas]
    return {s: solve_coefficients(profiles, (sigma_rel_to_gamma(s), t_end))[1] for s in sigma_rels}


def sweep(
    scorer: Scorer,
    ckpt: Path,
    sigma_rels: Sequence[float],
    nfe: int = 10,
    num_samples: int = 500,
    seeds: int = 0,
) -> dict[str, Any]:
    """FD on the validation seeds (and on ``seeds`` reported seed sets) for every length; the
    length with the lowest validation FD is ``best``."""
    errors = fit_errors(ckpt, sigma_rels)
    rows = []
    for s in sigma_rels:
        loaded = load_model(ckpt, sigma_rel=s)
        row = {
            "sigma_rel": s,
            "fit_error": round(errors[s], 4),
            "fd_validation": round(scorer.frechet(loaded, nfe, VALIDATION_SEED, num_samples), 3),
        }
        for k in range(seeds):
            row[f"fd_set{k}"] = round(scorer.frechet(loaded, nfe, k * scorer.num_samples), 3)
        rows.append(row)
        print(table([row], list(row)).splitlines()[-1], flush=True)
    best = min(rows, key=lambda r: r["fd_validation"])["sigma_rel"]
    return {"rows": rows, "best": best}


def plot(
    rows: list[dict[str, Any]], floor: float, run_ema: dict[str, float], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["sigma_rel"] for r in rows]
    for key, label in [("fd_validation", "validation seeds (choose)")] + [
        (k, f"seed set {k[-1]}") for k in rows[0] if k.startswith("fd_set")
    ]:
        ax.plot(xs, [r[key] for r in rows], marker="o", ms=3, label=label)
    ax.axhline(floor, color="gray", ls=":", label="real digits (the data's own figure)")
    ax.axhline(1.5 * floor, color="gray", ls="--", lw=0.8, label="1.5x real digits (goal)")
    for name, fd in run_ema.items():
        ax.axhline(fd, color="C3", lw=0.8, ls="-.", label=name)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("EMA length sigma_rel (EDM2), reconstructed post hoc")
    ax.set_ylabel("Fréchet distance to the held-out digits (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--sigma-rels", type=float, nargs="+", default=list(SIGMA_RELS))
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=2, help="reported seed sets scored too")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    scorer = Scorer(args.num_samples, args.seeds, (args.nfe,))
    res = sweep(scorer, args.ckpt, args.sigma_rels, args.nfe, args.num_samples, args.seeds)
    run_ema = load_model(args.ckpt)
    run_fd = {
        f"the run's EMA, set {k}": round(scorer.frechet(run_ema, args.nfe, k * args.num_samples), 3)
        for k in range(args.seeds)
    }
    print(f"\n{args.ckpt} (step {run_ema.global_step}), {args.nfe} NFE, {args.num_samples} samples")
    print(f"real digits' figure {scorer.floor:.3f}; the run's own EMA: {run_fd}\n")
    print(table(res["rows"], list(res["rows"][0])))
    print(f"\nchosen by validation: sigma_rel={res['best']}")
    path = args.plot or ROOT / "outputs" / "bench" / f"ema_sweep_{stamp}.png"
    title = f"{args.ckpt.parent.parent.name}, step {run_ema.global_step}, {args.nfe} NFE"
    plot(res["rows"], scorer.floor, run_fd, path, title)
    print(f"plot: {path}")
    write_json(
        f"ema_sweep_{stamp}",
        {
            "machine": machine(),
            "ckpt": str(args.ckpt),
            "real_digits_figure": scorer.floor,
            "run_ema": run_fd,
            **res,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
