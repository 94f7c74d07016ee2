"""Levers on the default digits recipe at a fixed compute budget (issue 22): each lever is a set of
``train.py`` overrides, trained for the optimizer steps that cost what the baseline's budget
costs, and scored like ``quality.py`` (Fréchet distance to the held-out digits in the digit
classifier's feature space, relative to as many real training digits' own figure).

Steps per lever: the baseline's ``--steps`` times the baseline's CPU time per training step over
the lever's (``cost``: both measured in interleaved rounds, one thread, process CPU time, so the
comparison is insensitive to other jobs on the machine). A lever that makes a step cheaper
(smaller batch or network) gets more steps. Every run tracks post-hoc EMA profiles, so each lever
is scored with the run's own EMA and with the EMA length chosen by validation (``ema_sweep.py``:
the lowest 10-NFE distance on the validation seeds over ``--sigma-rels``).

    python bench/recipe_levers.py cost                                # CPU s per step, each lever
    python bench/recipe_levers.py run --steps 850 --threads 1 --levers base lr_2e-3
    python bench/recipe_levers.py run --steps 850 --threads 1 --nfe 10 100 --levers base

Prints a Markdown table (one row per lever); writes JSON under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, table, write_json  # noqa: E402
from ema_sweep import SIGMA_RELS, sweep  # noqa: E402
from quality import ROOT, Scorer, load, train  # noqa: E402
from train_throughput import recipe_step  # noqa: E402

# name: (overrides, what it changes). The baseline is the default recipe (conf/train.yaml).
LEVERS: dict[str, tuple[list[str], str]] = {
    "base": ([], "the default recipe"),
    # optimisation
    "lr_2e-3": (["optimizer.lr=2e-3"], "Adam lr 2e-3 (default 1e-3)"),
    "lr_5e-4": (["optimizer.lr=5e-4"], "Adam lr 5e-4"),
    "warmup_0": (["lr_scheduler.warmup_steps=0"], "no LR warm-up (default 100 steps)"),
    "cosine": (["lr_scheduler=cosine"], "cosine decay to 0 over the run"),
    "linear": (["lr_scheduler=linear"], "linear decay to 0 over the run"),
    "beta2_0.99": (["optimizer.betas=[0.9,0.99]"], "Adam beta2 0.99 (default 0.999)"),
    "eps_1e-6": (["optimizer.eps=1e-6"], "Adam eps 1e-6 (default 1e-8)"),
    "no_clip": (["trainer.gradient_clip_val=null"], "no gradient clipping (default norm 1)"),
    "batch_64": (["data.batch_size=64"], "batch 64 (default 128), same compute: more steps"),
    "batch_256": (["data.batch_size=256"], "batch 256, same compute: fewer steps"),
    # loss weighting / parameterisation
    "l_simple": (
        ["objective=ddpm"],
        "Ho et al.'s L_simple (the default adds min-SNR-5 weighting)",
    ),
    "v_pred": (["objective=v_prediction"], "v-prediction with min-SNR-5 (objective=v_prediction)"),
    # network for the budget
    "width_24": (["model.model_channels=24", "model.norm_groups=8"], "24/48/48 channels"),
    "width_48": (["model.model_channels=48"], "48/96/96 channels"),
    "no_attn": (["model.attention_resolutions=[]"], "no attention"),
    "two_levels": (["model.channel_mult=[1,2]"], "two levels (16, 8)"),
    "res_2": (["model.num_res_blocks=2"], "two ResBlocks a level"),
    "dropout_0.1": (["model.dropout=0.1"], "dropout 0.1"),
    # EMA
    "ema_power_0.10": (["callbacks.ema.sigma_rel=0.10"], "power-function EMA sigma_rel 0.10"),
}
# Bench runs draw no pictures (they do not change the weights); validation stays.
QUIET = ["~callbacks.sample_grid", "~callbacks.forward_picture", "~callbacks.playground"]


def step_cost(overrides: list[str], batches: int, warmup: int = 2) -> float:
    """CPU seconds of one training step of the recipe with ``overrides`` (its data, timestep
    sampler, noise, loss, backward, clipping, optimizer: ``train_throughput.recipe_step``), over
    ``batches`` steps after ``warmup`` ones."""
    _, step, _ = recipe_step(False, overrides)
    for _ in range(warmup):
        step()
    c0 = time.process_time()
    for _ in range(batches):
        step()
    return (time.process_time() - c0) / batches


def cost(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    names = args.levers or list(LEVERS)
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            rounds[n].append(step_cost(LEVERS[n][0], args.batches))
    base = median(rounds["base"]) if "base" in rounds else None
    rows = [
        {
            "lever": n,
            "cpu_s_per_step": round(median(r), 3),
            "x_base": round(median(r) / base, 3) if base else "",
            "rounds": " ".join(f"{v:.3f}" for v in r),
        }
        for n, r in rounds.items()
    ]
    print(table(rows, list(rows[0])))
    write_json(
        f"recipe_levers_cost_{time.strftime('%Y-%m-%d_%H-%M-%S')}",
        {"machine": machine(), "rows": rows},
        args.out,
    )


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    costs = dict(args.cost or [])
    scorer = Scorer(args.num_samples, args.seeds, args.nfe)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    rows = []
    for name in args.levers:
        overrides, what = LEVERS[name]
        ratio = float(costs.get("base", 1.0)) / float(costs.get(name, costs.get("base", 1.0)))
        steps = int(round(args.steps * ratio))
        run_dir = ROOT / "outputs" / "bench" / f"levers_{stamp}" / name
        res = train(
            run_dir,
            [
                *QUIET,
                f"callbacks.posthoc_ema.every_n_steps={args.snapshot_every}",
                *overrides,
                f"seed={args.train_seed}",
            ],
            steps=steps,
            threads=args.threads,
        )
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        row: dict[str, Any] = {"lever": name, "what": what, "steps": res["steps"], **res}
        row.update({f"run_{k}": v for k, v in scorer.score(load(ckpt, None, "cpu")).items()})
        best = sweep(scorer, ckpt, args.sigma_rels)["best"]
        row["sigma_rel"] = best
        row.update({f"ph_{k}": v for k, v in scorer.score(load(ckpt, best, "cpu")).items()})
        rows.append(row)
        print(row, flush=True)
    cols = (
        ["lever", "steps", "cpu_s"]
        + [f"{p}_{k}_{n}" for p in ("run", "ph") for n in args.nfe for k in ("fd", "x")]
        + ["sigma_rel"]
    )
    print(f"\nbudget: {args.steps} baseline steps; real digits' figure {scorer.floor:.3f}\n")
    print(table(rows, cols))
    write_json(
        f"recipe_levers_{stamp}",
        {
            "machine": machine(),
            "budget_steps": args.steps,
            "train_seed": args.train_seed,
            "real_digits_figure": scorer.floor,
            "rows": rows,
        },
        args.out,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost", help="CPU seconds per training step of each lever")
    c.add_argument("--levers", nargs="+", choices=list(LEVERS), default=None)
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--batches", type=int, default=3)
    c.add_argument("--out", default=None)
    r = sub.add_parser("run", help="train and score each lever at the budget")
    r.add_argument("--levers", nargs="+", choices=list(LEVERS), default=["base"])
    r.add_argument("--steps", type=int, required=True, help="the baseline's optimizer steps")
    r.add_argument(
        "--cost",
        nargs=2,
        action="append",
        metavar=("LEVER", "CPU_S"),
        help="CPU s per step from `cost` (default: every lever costs the baseline's)",
    )
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--train-seed", type=int, default=0)
    r.add_argument("--seeds", type=int, default=2)
    r.add_argument("--num-samples", type=int, default=1000)
    r.add_argument("--nfe", type=int, nargs="+", default=[10])
    r.add_argument("--sigma-rels", type=float, nargs="+", default=list(SIGMA_RELS))
    r.add_argument(
        "--snapshot-every", type=int, default=25, help="steps between post-hoc EMA snapshots"
    )
    r.add_argument("--out", default=None)
    args = p.parse_args()
    cost(args) if args.cmd == "cost" else run(args)


if __name__ == "__main__":
    main()
