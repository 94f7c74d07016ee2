"""Soak test: kill a training run K times at random moments, resume it each time, and check that
it ends with exactly the weights of an uninterrupted run.

    python bench/soak.py --kills 6 --steps 60            # the default recipe (digits), CPU
    python bench/soak.py --kills 20 --steps 400 -- trainer.devices=2 trainer.strategy=ddp

First an uninterrupted reference run of ``--steps`` steps. Then the soaked run: each round launches
``python src/train.py ... run_dir=<dir> ckpt_path=auto trainer.max_steps=<steps>`` (the first round
starts the run, later ones resume it) and, while kills remain, sends one of SIGTERM, SIGINT,
SIGUSR2 (to the launching process, like ``scancel`` / Ctrl+C / submitit's time-limit signal) or
SIGKILL (to the whole process group, DDP ranks too) at a random moment: at a random step of the
rest of the run plus a random fraction of a step (mid-step, mid-save, mid-validation), or, with
probability ``--startup-kill``, during start-up. After every kill it

* opens every ``*.ckpt`` of the run with ``torch.load(weights_only=True)``: a kill must never
  leave a truncated checkpoint under a final name;
* checks that the next round starts at the step of the newest checkpoint (a probe callback inside
  the training process records the step it started from and the last step it completed).

At the end the soaked run's weights, EMA weights and Adam moments are compared with the
reference's: every kill is survived only if they agree to 1e-6. Prints the kills survived and the
maximum difference, and writes ``soak.json`` into the output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "train.py"
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR2", "SIGKILL")
# The default recipe (digits, batch 128, the digits U-Net) with cadences for a short run.
CADENCES = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "trainer.val_check_interval=20",
    "callbacks.sample_grid.every_n_steps=25",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.batch_size=4",
    "callbacks.sample_grid.at_train_end=false",
    "sampler.steps=5",
    "num_threads=1",
]
TOLERANCE = 1e-6


class StepProbe(pl.Callback):
    """Soak-only callback (runs inside the training process): records the step a round started
    from, the last completed step and the process id, each written atomically."""

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


def _default_sigint() -> None:
    """A soak started in the background (``nohup ... &``) inherits an ignored SIGINT, and so would
    the training process: give it Python's usual Ctrl+C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _read_probe(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_checkpoints(run_dir: Path) -> tuple[int, list[str]]:
    """(number of checkpoints opened, the ones that failed to load)."""
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
    return len(files), failed


def resume_step(run_dir: Path) -> int:
    """The step the next round resumes from (what ``ckpt_path=auto`` picks), 0 for a new run."""
    import warnings

    import torch

    from ddpm.run.checkpoint_files import find_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = find_checkpoint(run_dir) if run_dir.is_dir() else None
    if path is None:
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def max_difference(a_path: Path, b_path: Path) -> float:
    """Largest absolute difference of weights, EMA weights and Adam moments of two checkpoints."""
    import torch

    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    pairs = [(a["state_dict"], b["state_dict"]), (a["ema_state_dict"], b["ema_state_dict"])]
    pairs += list(
        zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values())
    )
    diff = 0.0
    for x, y in pairs:
        if x.keys() != y.keys():
            return float("inf")
        for k in x:
            diff = max(diff, (x[k].double() - y[k].double()).abs().max().item())
    return diff


def run_reference(common: list[str], reference_dir: Path, out: Path, env: dict) -> None:
    """The uninterrupted run the soaked one must equal."""
    ref = subprocess.run(
        [*common, f"run_dir={reference_dir}"],
        cwd=out,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if ref.returncode != 0:
        sys.exit(f"the reference run failed:\n{ref.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--steps", type=int, default=60, help="trainer.max_steps of the run")
    p.add_argument("--out", type=Path, default=None, help="default outputs/soak/<time>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signals", default=",".join(SIGNALS), help="comma-separated, drawn uniformly")
    p.add_argument(
        "--startup-kill", type=float, default=0.15, help="probability of a start-up kill"
    )
    p.add_argument(
        "--grace", type=float, default=120.0, help="seconds before escalating to SIGKILL"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu | cuda | auto: the runs' trainer.accelerator (cuda means gpu)",
    )
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    args = p.parse_args()

    rng = random.Random(args.seed)
    kinds = [getattr(signal, s.strip()) for s in args.signals.split(",")]
    out = (args.out or ROOT / "outputs" / "soak" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    run_dir, reference_dir, probe = out / "run", out / "reference", out / "probe.json"
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        ),
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "1",
        "OMP_NUM_THREADS": "1",
    }
    common = [
        sys.executable,
        str(TRAIN),
        *CADENCES,
        f"paths.root_dir={out}",
        f"trainer.max_steps={args.steps}",
        "+callbacks.soak_probe._target_=soak.StepProbe",
        f"+callbacks.soak_probe.path={probe}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else args.device}",
        *args.overrides,
    ]
    cmd = [*common, f"run_dir={run_dir}", "ckpt_path=auto"]
    print("command:", " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: remove it (a finished reference run next to it is reused)")
    if resume_step(reference_dir) == args.steps:
        print(f"reusing the uninterrupted reference run in {reference_dir}", flush=True)
    else:
        run_reference(common, reference_dir, out, env)
        print(f"reference: {args.steps} steps in {time.monotonic() - t0:.0f} s", flush=True)

    rounds: list[dict[str, Any]] = []
    expected_start, finished = 0, False
    while not finished and len(rounds) < 4 * args.kills + 10:
        kills_done = sum(r["signal"] is not None for r in rounds)
        probe.unlink(missing_ok=True)
        log = open(out / f"round_{len(rounds):03d}.log", "w")
        t_start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=out,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        kill, target, where = None, None, "finish"
        if kills_done < args.kills:
            kill = rng.choice(kinds)
            if rng.random() < args.startup_kill:
                where = "start-up"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=rng.uniform(0.0, 6.0))
            else:  # at a random step of the rest of the run, plus a fraction of a step
                # (the remaining kills share what is left of the run, so all of them land)
                span = max(1, (args.steps - 1 - expected_start) // (args.kills - kills_done))
                target = expected_start + rng.randrange(span)
                where = f"step {target}+"
                while proc.poll() is None and _read_probe(probe).get("step", -1) < target:
                    time.sleep(0.02)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=rng.uniform(0.0, 0.5))
        delivered = kill is not None and proc.poll() is None
        escalated = False
        if delivered:
            if kill == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group (DDP ranks too)
            else:
                os.kill(proc.pid, kill)  # the launching process only
            try:
                proc.wait(timeout=args.grace)
            except subprocess.TimeoutExpired:
                escalated = True
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers (DDP children)
        log.close()
        state = _read_probe(probe)
        n_ckpt, failed = check_checkpoints(run_dir)
        resume = resume_step(run_dir)
        started = state.get("start")
        rec = {
            "round": len(rounds),
            "signal": signal.Signals(kill).name if delivered else None,
            "at": where if delivered else None,
            "seconds": round(time.monotonic() - t_start, 1),
            "exit_code": proc.returncode,
            "start_step": started,
            "start_ok": started is None or started == expected_start,
            "last_completed_step": state.get("step"),
            "resume_step": resume,
            "checkpoints": n_ckpt,
            "load_failures": failed,
            "escalated_to_sigkill": escalated,
        }
        rounds.append(rec)
        finished = not delivered and proc.returncode == 0
        if not delivered and proc.returncode != 0:
            rec["log_tail"] = (out / f"round_{rec['round']:03d}.log").read_text()[-2000:]
            print((rec["log_tail"]), flush=True)
            break
        expected_start = resume
        finished = finished or resume == args.steps  # a kill after the final save
        print(
            f"round {rec['round']:2d}: {rec['signal'] or 'no kill'} at {rec['at'] or '-'}"
            f" exit={rec['exit_code']} started at {started} last done {state.get('step')}"
            f" next resume {resume} ckpts={n_ckpt} bad={len(failed)}",
            flush=True,
        )

    final = run_dir / "checkpoints" / "last.ckpt"
    diff = (
        max_difference(reference_dir / "checkpoints" / "last.ckpt", final)
        if finished
        else float("inf")
    )
    kills = [r for r in rounds if r["signal"]]
    exact = finished and diff <= TOLERANCE and resume_step(run_dir) == args.steps
    survived = [
        r
        for r in kills
        if exact
        and not r["load_failures"]
        and not r["escalated_to_sigkill"]
        and (
            rounds[r["round"] + 1]["start_ok"]
            if r["round"] + 1 < len(rounds)
            else r["resume_step"] == args.steps  # killed after the final save
        )
    ]
    summary = {
        "steps": args.steps,
        "kills": len(kills),
        "by_signal": {s: sum(r["signal"] == s for r in kills) for s in SIGNALS},
        "kills_survived": len(survived),
        "max_difference_to_uninterrupted": diff,
        "checkpoint_load_failures": sorted({f for r in rounds for f in r["load_failures"]}),
        "wrong_resume_step": [r["round"] for r in rounds if not r["start_ok"]],
        "minutes": round((time.monotonic() - t0) / 60.0, 1),
    }
    (out / "soak.json").write_text(
        json.dumps({"command": cmd[1:], "summary": summary, "rounds": rounds}, indent=2) + "\n"
    )
    print()
    for k, v in summary.items():
        print(f"{k:<34} {v}")
    print(f"details: {out / 'soak.json'}")
    print(
        f"{len(survived)}/{len(kills)} kills survived; max difference to the uninterrupted run: {diff:.3g}"
    )
    sys.exit(0 if exact and len(survived) == len(kills) else 1)


if __name__ == "__main__":
    main()
