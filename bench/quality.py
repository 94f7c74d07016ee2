"""Quality per CPU-minute of the default recipe: test NLL (bits/dim) after N minutes of training.

Trains ``python src/train.py`` (the default digits recipe, or the recipe the extra overrides
choose) for the longest requested wall-clock time, with a checkpoint at every requested minute
mark, then computes the exact variational bound on the test split for each checkpoint with
``python src/evaluate.py`` and prints a table (JSON under ``bench/results/``):

    python bench/quality.py                              # 5 and 10 minutes, default recipe
    python bench/quality.py --minutes 2 4 -- schedule=cosine
    python bench/quality.py --device cuda -- model=cifar10 data=cifar10   # on a GPU

Sample grids of every run are under the printed run directory (``samples/``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str]) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def val_loss_at(metrics_csv: Path, step: int) -> float | None:
    """val/loss_ema logged at the last validation at or before ``step``."""
    if not metrics_csv.exists():
        return None
    best = None
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("val/loss_ema") and int(row["step"]) <= step:
                best = float(row["val/loss_ema"])
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[5.0, 10.0])
    p.add_argument("--nll-images", type=int, default=None, help="test images (default: all)")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--device",
        default="auto",
        help="cpu | cuda | auto: the runs' trainer.accelerator (cuda means gpu)",
    )
    p.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = p.parse_args()
    marks = sorted(args.minutes)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = ROOT / "outputs" / "bench" / f"quality_{stamp}"
    total = marks[-1]
    hh, rest = divmod(int(round(total * 60)), 3600)
    mm, ss = divmod(rest, 60)
    cmd = [
        sys.executable,
        "src/train.py",
        f"run_dir={run_dir}",
        "logger=csv",
        "trainer.max_steps=-1",
        f"trainer.max_time=00:{hh:02d}:{mm:02d}:{ss:02d}",
        "trainer.enable_progress_bar=false",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else args.device}",
        *args.overrides,
    ]
    for m in marks[:-1]:  # a checkpoint at every earlier minute mark (Lightning's timer)
        key = f"+callbacks.time_{int(m * 60)}s"
        cmd += [
            f"{key}._target_=ddpm.callbacks.atomic_checkpoint.AtomicModelCheckpoint",
            f"{key}.dirpath={run_dir}/checkpoints/time_{int(m * 60)}s",
            f"{key}.filename='step_{{step:07d}}'",
            f"{key}.auto_insert_metric_name=false",
            f"{key}.save_top_k=-1",
            f"{key}.every_n_epochs=0",
            f"{key}.train_time_interval._target_=datetime.timedelta",
            f"{key}.train_time_interval.seconds={int(m * 60)}",
        ]
    t0 = time.time()
    run(cmd, env)
    train_wall = time.time() - t0
    ckpts = {marks[-1]: run_dir / "checkpoints" / "last.ckpt"}
    for m in marks[:-1]:
        found = sorted((run_dir / "checkpoints" / f"time_{int(m * 60)}s").glob("step_*.ckpt"))
        if found:  # the first save of that timer: at the mark
            ckpts[m] = found[0]
    rows = []
    metrics_csv = next(iter(sorted(run_dir.glob("**/metrics.csv"))), Path("missing"))
    for m in marks:
        ckpt = ckpts.get(m)
        if ckpt is None or not ckpt.exists():
            print(f"no checkpoint for {m} min")
            continue
        eval_dir = run_dir / f"evaluate_{m:g}min"
        ev = [
            sys.executable,
            "src/evaluate.py",
            f"ckpt_path={ckpt}",
            f"run_dir={eval_dir}",
            "metrics.enabled=false",
            "progress=false",
            f"accelerator={'gpu' if args.device == 'cuda' else args.device}",
        ]
        if args.nll_images:
            ev.append(f"nll.num_images={args.nll_images}")
        t1 = time.time()
        run(ev, env)
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        step = int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
        rows.append(
            {
                "minutes": m,
                "steps": step,
                "val_loss_ema": val_loss_at(metrics_csv, step),
                "test_nll_bpd": round(metrics["test/nll_bpd"], 4),
                "nll_images": int(metrics["test/nll_num_images"]),
                "eval_s": round(time.time() - t1, 1),
                "checkpoint": str(ckpt.relative_to(ROOT)),
            }
        )
    print(f"\nrun directory: {run_dir} (train wall {train_wall:.0f} s)")
    print(f"overrides: {' '.join(args.overrides) or '(default recipe)'}\n")
    print(table(rows, list(rows[0]) if rows else ["minutes"]))
    payload = {"machine": machine(), "overrides": args.overrides, "rows": rows}
    print(write_json(f"quality_{stamp}", payload, args.out))


if __name__ == "__main__":
    main()
