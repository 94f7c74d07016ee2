"""Soak test: train for M minutes while killing the process at random moments, then resume.

    python bench/soak.py --minutes 3                  # tiny digits run on the CPU
    python bench/soak.py --minutes 30 --sigkill 0.3 -- trainer.devices=2 trainer.strategy=ddp

Each round launches ``python src/train.py ... run_dir=<dir> ckpt_path=auto`` (the first round
starts the run, later ones resume it), waits a random time after training started (or, with
probability ``--startup-kill``, a random moment of start-up), then sends SIGTERM (to the launching
process, like ``kill``/``scancel``) or SIGKILL (to the whole process group; ``--sigkill`` = its
probability). The moment can fall anywhere: mid-step, mid-save, mid-validation.
After the process is gone it

* opens every ``*.ckpt`` of the run with ``torch.load(weights_only=True)``: any that fails is a
  failure (a kill must never leave a truncated checkpoint under a final name);
* compares the last step the process completed (written by a probe callback) with the step of the
  checkpoint the next round will resume from: the steps lost to that kill;
* checks that the next round really starts at that step (the probe records the start step).

Prints a table and writes ``soak.json`` into the output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "train.py"
TINY = [
    "model=tiny",
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "schedule.num_timesteps=50",
    "data.batch_size=16",
    "optimizer.lr=1e-3",
    "lr_scheduler.warmup_steps=100",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.val_check_interval=50",
    "trainer.limit_val_batches=2",
    "callbacks.model_checkpoint.every_n_train_steps=20",
    "callbacks.sample_grid.every_n_steps=100000000",
    "callbacks.sample_grid.at_train_end=false",
]


class StepProbe(pl.Callback):
    """Soak-only callback (runs inside the training process): records the step a round started
    from and the last completed step, each written atomically."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.start: int | None = None

    def _write(self, step: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"start": self.start, "step": step, "pid": os.getpid()}))
        os.replace(tmp, self.path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.start = trainer.global_step
            self._write(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.is_global_zero:
            self._write(trainer.global_step)


def _read_probe(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_checkpoints(run_dir: Path) -> tuple[int, list[str], int]:
    """(number of checkpoints opened, the ones that failed to load, stale .partial files)."""
    import torch

    files = sorted(run_dir.rglob("*.ckpt"))
    failed = []
    for f in files:
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
            if "state_dict" not in ckpt or "global_step" not in ckpt:
                failed.append(f"{f.name}: incomplete")
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            failed.append(f"{f.name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return len(files), failed, len(list(run_dir.rglob("*.partial")))


def resume_step(run_dir: Path) -> int:
    """The step the next round resumes from (what ``ckpt_path=auto`` picks), 0 for a new run."""
    import warnings

    import torch

    from ddpm.run.checkpoints import find_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = find_checkpoint(run_dir) if run_dir.is_dir() else None
    if path is None:
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=None, help="default outputs/soak/<time>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigkill", type=float, default=0.5, help="probability of SIGKILL vs SIGTERM")
    p.add_argument(
        "--min-wait", type=float, default=0.0, help="seconds of training before the kill, at least"
    )
    p.add_argument(
        "--max-wait", type=float, default=8.0, help="seconds of training before the kill, at most"
    )
    p.add_argument(
        "--startup-kill",
        type=float,
        default=0.15,
        help="probability of killing at a random moment of start-up instead",
    )
    p.add_argument("--grace", type=float, default=60.0, help="SIGTERM: seconds before SIGKILL")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    args = p.parse_args()

    rng = random.Random(args.seed)
    out = args.out or ROOT / "outputs" / "soak" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    run_dir, probe = out / "run", out / "probe.json"
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        ),
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "1",
    }
    base = [
        sys.executable,
        str(TRAIN),
        *TINY,
        f"paths.root_dir={out}",
        f"run_dir={run_dir}",
        "ckpt_path=auto",
        "+callbacks.soak_probe._target_=soak.StepProbe",
        f"+callbacks.soak_probe.path={probe}",
        *args.overrides,
    ]
    cmd = [*base, "trainer.max_steps=100000000"]
    print("command:", " ".join(cmd[1:]), flush=True)

    rounds: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60.0 * args.minutes
    t_start = time.monotonic()
    expected_start = 0
    while time.monotonic() < deadline:
        probe.unlink(missing_ok=True)
        log = open(out / f"round_{len(rounds):03d}.log", "w")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=out,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        kill = signal.SIGKILL if rng.random() < args.sigkill else signal.SIGTERM
        if rng.random() < args.startup_kill:  # some kills land during start-up
            wait = rng.uniform(0.0, args.max_wait)
        else:  # most while training: after the first step, plus a random time
            while proc.poll() is None and (_read_probe(probe) or {}).get("start") is None:
                time.sleep(0.05)
            wait = rng.uniform(args.min_wait, args.max_wait)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        early_exit = proc.returncode is not None
        t_sig = time.monotonic()
        escalated = False
        if not early_exit:
            if kill == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group (DDP ranks too)
                proc.wait()
            else:
                os.kill(proc.pid, signal.SIGTERM)  # the launching process only
                try:
                    proc.wait(timeout=args.grace)
                except subprocess.TimeoutExpired:
                    escalated = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        t_exit = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers (DDP children)
        log.close()

        state = _read_probe(probe)
        started = state is not None and state.get("start") is not None
        last_done = state["step"] if state else None
        n_ckpt, failed, partial = check_checkpoints(run_dir)
        resume = resume_step(run_dir)
        progress_before = expected_start
        rec = {
            "round": len(rounds),
            "signal": None if early_exit else signal.Signals(kill).name,
            "after_s": round(t_sig - t0, 2),
            "exit_code": proc.returncode,
            "shutdown_s": round(t_exit - t_sig, 2),
            "escalated_to_sigkill": escalated,
            "training_started": started,
            "start_step": state.get("start") if state else None,
            "start_ok": (not started) or state.get("start") == expected_start,
            "last_completed_step": last_done,
            "resume_step": resume,
            "steps_lost": max(
                0, (last_done if last_done is not None else progress_before) - resume
            ),
            "checkpoints": n_ckpt,
            "load_failures": failed,
            "partial_files": partial,
        }
        if early_exit:
            rec["log_tail"] = (out / f"round_{rec['round']:03d}.log").read_text()[-2000:]
        rounds.append(rec)
        expected_start = resume
        print(
            f"round {rec['round']:3d}: {rec['signal'] or 'EXITED'} after {rec['after_s']:5.1f}s"
            f" exit={rec['exit_code']} start={rec['start_step']} done={last_done}"
            f" resume={resume} lost={rec['steps_lost']} ckpts={n_ckpt}"
            f" bad={len(failed)} partial={partial}",
            flush=True,
        )

    # a final uninterrupted check: the run resumes and takes a few more steps
    final_step = resume_step(run_dir) + 5
    res = subprocess.run(
        [*base, f"trainer.max_steps={final_step}"],
        cwd=out,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    final_ok = res.returncode == 0 and resume_step(run_dir) == final_step

    kills = [r for r in rounds if r["signal"]]
    by_sig = {s: [r for r in kills if r["signal"] == s] for s in ("SIGTERM", "SIGKILL")}

    def survived(r: dict) -> bool:
        """No broken checkpoint, and the next round (or the final run) resumed where expected."""
        nxt = rounds[r["round"] + 1] if r["round"] + 1 < len(rounds) else None
        return not r["load_failures"] and (nxt["start_ok"] if nxt is not None else final_ok)

    lost = {s: [r["steps_lost"] for r in v] for s, v in by_sig.items()}
    term_ok = [r for r in by_sig["SIGTERM"] if r["exit_code"] == 128 + signal.SIGTERM]
    summary = {
        "minutes": round((time.monotonic() - t_start) / 60.0, 2),
        "rounds": len(rounds),
        "kills": len(kills),
        "sigterm": len(by_sig["SIGTERM"]),
        "sigkill": len(by_sig["SIGKILL"]),
        "kills_survived": sum(survived(r) for r in kills),
        "sigterm_clean_exit_143": len(term_ok),
        "sigterm_before_training": sum(not r["training_started"] for r in by_sig["SIGTERM"]),
        "sigterm_escalated": sum(r["escalated_to_sigkill"] for r in by_sig["SIGTERM"]),
        "steps_lost_sigterm_total": sum(lost["SIGTERM"]),
        "steps_lost_sigterm_max": max(lost["SIGTERM"], default=0),
        "steps_lost_sigkill_total": sum(lost["SIGKILL"]),
        "steps_lost_sigkill_mean": round(statistics.mean(lost["SIGKILL"]), 2)
        if lost["SIGKILL"]
        else 0,
        "steps_lost_sigkill_max": max(lost["SIGKILL"], default=0),
        "checkpoint_load_failures": sorted({f for r in rounds for f in r["load_failures"]}),
        "wrong_resume_step": [r["round"] for r in rounds if not r["start_ok"]],
        "unexpected_exits": [r["round"] for r in rounds if r["signal"] is None],
        "partial_files_seen": sum(r["partial_files"] > 0 for r in rounds),
        "final_step": resume_step(run_dir),
        "final_resume_ok": final_ok,
    }
    (out / "soak.json").write_text(
        json.dumps({"command": cmd[1:], "summary": summary, "rounds": rounds}, indent=2) + "\n"
    )
    width = max(len(k) for k in summary)
    print("\n" + "-" * (width + 30))
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 30))
    print(f"details: {out / 'soak.json'}")
    bad = (
        summary["checkpoint_load_failures"]
        or summary["wrong_resume_step"]
        or summary["unexpected_exits"]
        or not final_ok
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
