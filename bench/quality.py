"""Time to a good sample (issue 22): the default recipe trained for N minutes, its samples scored
by the digit classifier against the data's own figure.

For each budget, one training run of ``python src/train.py`` (the default digits recipe, or the
recipe the extra overrides choose), then ``--num-samples`` samples from each of ``--seeds`` seed
sets (set k: seeds k*N .. (k+1)*N - 1) with DPM-Solver++(2M) at 10 and 100 network evaluations
(NFE), EMA weights. Score (``bench/sample_quality.py``'s measure): the Fréchet distance to the
180 held-out digits in the digit classifier's feature space (``digits_classifier.py``), printed
beside the data's own figure, the same distance of as many real training digits, and as a ratio
to it (1 = as close to unseen digits as real digits are; the issue's goal is <= 1.5 after 8
minutes).

A budget in minutes is wall clock including start-up, validation, pictures and checkpoints (the
run gets ``trainer.max_time`` = budget - the start-up measured by a one-step launch): run it on an
idle machine. ``--steps`` gives fixed optimizer-step budgets instead (load-insensitive, what the
lever comparisons use), with ``--threads 1`` on a shared machine.

    python bench/quality.py --minutes 4 8 --seeds 2             # the table of bench/README.md
    python bench/quality.py --steps 400 850 --threads 1         # fixed step budgets
    python bench/quality.py --steps 850 --threads 1 -- optimizer.lr=2e-3   # a lever
    python bench/quality.py --ckpt outputs/.../last.ckpt --ema-sigma-rel 0.1   # score only

Prints a Markdown table; writes JSON under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json  # noqa: E402
from ddpm.checkpoint import LoadedModel, load_model, open_checkpoint  # noqa: E402
from ddpm.diffusion import DPMSolverSampler  # noqa: E402
from ddpm.utils.seeding import PerSampleGenerator  # noqa: E402
from digits_classifier import ROOT, DigitsClassifier  # noqa: E402

NFES = (10, 100)
# Seeds of the samples that choose an EMA length (bench/ema_sweep.py): never a reported seed set.
VALIDATION_SEED = 1_000_000


def run(cmd: list[str], log: Path | None = None) -> None:
    """Run ``cmd`` from the repository root (offline W&B); its output goes to ``log``."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    print("$", " ".join(cmd), flush=True)
    with open(log or os.devnull, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text()[-4000:] if log else ""
        raise SystemExit(f"{tail}\ncommand failed ({proc.returncode}): {' '.join(cmd)}")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(
    run_dir: Path,
    overrides: Sequence[str] = (),
    *,
    steps: int | None = None,
    seconds: float | None = None,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the recipe in ``run_dir`` for ``steps`` optimizer steps or ``seconds`` of
    ``trainer.max_time``; returns the steps reached, wall-clock and CPU seconds of the process."""
    cmd = [
        sys.executable,
        "src/train.py",
        f"run_dir={run_dir}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"trainer.accelerator={'gpu' if device == 'cuda' else device}",
    ]
    if threads:
        cmd.append(f"num_threads={threads}")
    if seconds is not None:
        s = max(1, int(seconds))
        cmd += ["trainer.max_steps=-1", f"trainer.max_time=00:00:{s // 60:02d}:{s % 60:02d}"]
    elif steps is not None:
        cmd.append(f"trainer.max_steps={steps}")
    cmd += list(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), children_cpu_s()
    run(cmd, run_dir.parent / f"{run_dir.name}.log")
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - c0
    ckpt = open_checkpoint(run_dir / "checkpoints" / "last.ckpt", mmap=True)
    return {"steps": int(ckpt["global_step"]), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


class Scorer:
    """Samples of a model at the NFE and seed sets asked for, scored against the held-out digits."""

    def __init__(
        self,
        num_samples: int = 1000,
        seeds: int = 2,
        nfes: Sequence[int] = NFES,
        batch_size: int = 500,
        device: str = "cpu",
    ) -> None:
        self.clf = DigitsClassifier.fit()
        self.num_samples, self.seeds, self.nfes = num_samples, seeds, tuple(nfes)
        self.batch_size, self.device = batch_size, torch.device(device)
        self.floor = self.clf.floor(num_samples)  # the data's own figure at the same count

    def samples(self, loaded: LoadedModel, nfe: int, first_seed: int, n: int) -> Tensor:
        """``n`` samples in [0, 1] with seeds first_seed .. first_seed + n - 1 (DPM-Solver++ 2M)."""
        sampler = DPMSolverSampler(steps=nfe)
        out = []
        for start in range(first_seed, first_seed + n, self.batch_size):
            seeds = range(start, min(start + self.batch_size, first_seed + n))
            gen = PerSampleGenerator(seeds, device=self.device)
            shape = (len(seeds), *loaded.sample_shape)
            x = sampler(loaded.net, loaded.diffusion, shape, generator=gen, device=self.device)
            out.append(x.float().cpu())
        return (torch.cat(out).clamp(-1, 1) + 1.0) / 2.0

    def frechet(
        self, loaded: LoadedModel, nfe: int, first_seed: int, n: int | None = None
    ) -> float:
        n = n or self.num_samples
        return self.clf.frechet(self.samples(loaded, nfe, first_seed, n))

    def score(self, loaded: LoadedModel) -> dict[str, Any]:
        """``fd_<nfe>``: one Fréchet distance per seed set; ``x_<nfe>``: their mean / the floor."""
        row: dict[str, Any] = {}
        for nfe in self.nfes:
            fds = [
                round(self.frechet(loaded, nfe, k * self.num_samples), 3) for k in range(self.seeds)
            ]
            row[f"fd_{nfe}"] = fds
            row[f"x_{nfe}"] = round(sum(fds) / len(fds) / self.floor, 2)
        return row


def load(ckpt: Path, sigma_rel: float | None, device: str) -> LoadedModel:
    return load_model(ckpt, use_ema=True, sigma_rel=sigma_rel, device=device)


def startup_seconds(overrides: Sequence[str], threads: int | None, device: str) -> float:
    """Wall-clock of a launch that trains one step without callbacks: imports, data, build."""
    out = ROOT / "outputs" / "bench" / f"startup_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    res = train(out, [*overrides, "callbacks=none"], steps=1, threads=threads, device=device)
    return float(res["wall_s"])


def fmt_row(row: dict[str, Any], nfes: Sequence[int], floor: float) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if not k.startswith(("fd_", "x_"))}
    for nfe in nfes:
        out[f"FD {nfe} NFE"] = " / ".join(f"{v:.3f}" for v in row[f"fd_{nfe}"])
    out["real digits"] = f"{floor:.3f}"
    for nfe in nfes:
        out[f"x real ({nfe})"] = row[f"x_{nfe}"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--minutes", type=float, nargs="+", help="wall-clock budgets (idle machine)"
    )
    budget.add_argument("--steps", type=int, nargs="+", help="optimizer-step budgets")
    budget.add_argument("--ckpt", type=Path, nargs="+", help="score these checkpoints only")
    p.add_argument("--seeds", type=int, default=2, help="seed sets of --num-samples samples")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--ema-sigma-rel", type=float, default=None, help="post-hoc EMA length")
    p.add_argument("--threads", type=int, default=None, help="torch threads (training, scoring)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/...)")
    p.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    scorer = Scorer(args.num_samples, args.seeds, args.nfe, device=args.device)
    print(
        f"{args.num_samples} real training digits' distance to the held-out digits: "
        f"{scorer.floor:.3f}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[dict[str, Any], Path]] = []
    if args.ckpt:
        jobs = [({"checkpoint": str(c)}, c) for c in args.ckpt]
    else:
        startup = 0.0
        if args.minutes:
            startup = startup_seconds(args.overrides, args.threads, args.device)
            print(f"start-up (one-step launch): {startup:.0f} s", flush=True)
        for budget in args.minutes or args.steps:
            name = f"{budget:g}min" if args.minutes else f"{budget}steps"
            run_dir = ROOT / "outputs" / "bench" / f"quality_{stamp}" / name
            kw = {"seconds": budget * 60 - startup} if args.minutes else {"steps": budget}
            res = train(run_dir, args.overrides, threads=args.threads, device=args.device, **kw)
            label = {"minutes": budget} if args.minutes else {"budget_steps": budget}
            jobs.append(({**label, **res}, run_dir / "checkpoints" / "last.ckpt"))
    for label, ckpt in jobs:
        loaded = load(ckpt, args.ema_sigma_rel, args.device)
        t0 = time.perf_counter()
        row = {**label, "steps": loaded.global_step, **scorer.score(loaded)}
        row["score_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        shown = fmt_row(row, args.nfe, scorer.floor)
        print(table([shown], list(shown)).splitlines()[-1], flush=True)
    shown_rows = [fmt_row(r, args.nfe, scorer.floor) for r in rows]
    print(f"\noverrides: {' '.join(args.overrides) or '(default recipe)'}")
    print(
        f"EMA: {'post-hoc sigma_rel=' + str(args.ema_sigma_rel) if args.ema_sigma_rel else 'the run'}"
        f"'s; {args.num_samples} samples per seed set, DPM-Solver++(2M); machine load "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print(table(shown_rows, list(shown_rows[0])))
    payload = {
        "machine": machine(),
        "overrides": args.overrides,
        "ema_sigma_rel": args.ema_sigma_rel,
        "real_digits_figure": scorer.floor,
        "num_samples": args.num_samples,
        "rows": rows,
    }
    print(write_json(f"quality_{stamp}", payload, args.out))


if __name__ == "__main__":
    main()
