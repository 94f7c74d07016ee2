"""Soak test: kill a training run K times at random moments, resume it each time, and check that
it ends with exactly the weights of an uninterrupted run.

    python bench/soak.py --kills 6 --steps 60            # the default recipe (digits), CPU
    python bench/soak.py --kills 20 --steps 400 -- trainer.devices=2 trainer.strategy=ddp
    python bench/soak.py --kills 0 --cases copy,extend,requeue_end --steps 60

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
reference's: every kill is survived only if they agree to 1e-6.

``--cases`` adds the ways a run is continued that are not a kill (``--kills 0``: those alone):

* ``copy``: a SIGTERM at a random step, ``cp -a run run_copy``, the copy resumed to the end: equal
  to the uninterrupted run, no ``last-v1.ckpt``, at most ``save_top_k`` step checkpoints.
* ``extend``: for each LR schedule (constant, cosine, linear) a run of ``steps/2`` finished, then
  extended with ``trainer.max_steps=<steps>`` (the command its refusal suggests) once without
  and once with a kill (SIGTERM or SIGKILL) at a random step of the extension and a resume: the
  two equal, the extension trained (weights moved), a decaying schedule was rebuilt over the new
  length; the constant one also equals the uninterrupted run.
* ``requeue_end``: a submitit job (``hydra/launcher=submitit_local``) gets SIGUSR2 at a random
  step (requeued, resumes) and again after its final step, during end-of-training work
  (requeued, finds its run finished): the sweep exits 0, each requeue has its own
  ``launches/<time>/`` record, the weights equal the uninterrupted run's.

Prints the kills survived, the cases that held and the maximum difference, and writes
``soak.json`` into the output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "train.py"
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR2", "SIGKILL")
CASES = ("copy", "extend", "requeue_end")
SCHEDULES = ("constant", "cosine", "linear")
SAVE_TOP_K = 3  # conf/callbacks/model_checkpoint.yaml
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


@dataclass
class Soak:
    """What every round and case shares: where, with which environment and base command."""

    out: Path
    env: dict
    common: list[str]  # python src/train.py + cadences + probe + max_steps=steps
    probe: Path
    steps: int
    rng: random.Random
    grace: float
    reference: Path  # the uninterrupted run's last.ckpt

    def start(self, cmd: list[str], log_name: str) -> tuple[subprocess.Popen, Any]:
        self.probe.unlink(missing_ok=True)
        log = open(self.out / log_name, "w")
        proc = subprocess.Popen(
            cmd,
            cwd=self.out,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        return proc, log

    def run(self, cmd: list[str], log_name: str) -> int:
        proc, log = self.start(cmd, log_name)
        proc.wait()
        log.close()
        return proc.returncode

    def wait_step(self, proc: subprocess.Popen, step: int, key: str = "step") -> dict:
        """Wait for the probe to report ``step`` (or the process to end); the probe's state."""
        while proc.poll() is None and _read_probe(self.probe).get(key, -1) < step:
            time.sleep(0.02)
        return _read_probe(self.probe)

    def stop(self, proc: subprocess.Popen, signum: int) -> None:
        """``signum`` to the launching process (SIGKILL: the whole group), then wait."""
        if proc.poll() is None:
            if signum == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signum)
        try:
            proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def probe_args(self) -> list[str]:
        return [a for a in self.common if "soak_probe" in a]


def signal_soak(soak: Soak, args: argparse.Namespace, run_dir: Path) -> list[dict[str, Any]]:
    """The kill rounds (module docstring): the rounds' records."""
    rng, out, probe = soak.rng, soak.out, soak.probe
    kinds = [getattr(signal, s.strip()) for s in args.signals.split(",")]
    cmd = [*soak.common, f"run_dir={run_dir}", "ckpt_path=auto"]
    print("command:", " ".join(cmd[1:]), flush=True)
    rounds: list[dict[str, Any]] = []
    expected_start, finished = 0, False
    while not finished and len(rounds) < 4 * args.kills + 10:
        kills_done = sum(r["signal"] is not None for r in rounds)
        t_start = time.monotonic()
        proc, log = soak.start(cmd, f"round_{len(rounds):03d}.log")
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
                soak.wait_step(proc, target)
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
    return rounds


# ---------------------------------------------------------------------------- cases
def case_copy(soak: Soak) -> dict[str, Any]:
    """SIGTERM at a random step, ``cp -a run run_copy``, resume the copy to the end."""
    run, copy = soak.out / "copy" / "run", soak.out / "copy" / "run_copy"
    stop_at = soak.rng.randrange(soak.steps // 3, 2 * soak.steps // 3)
    proc, log = soak.start([*soak.common, f"run_dir={run}"], "copy_first.log")
    soak.wait_step(proc, stop_at)
    soak.stop(proc, signal.SIGTERM)
    log.close()
    shutil.copytree(run, copy, symlinks=True)  # cp -a: contents, times, modes
    code = soak.run([*soak.common, f"run_dir={copy}", "ckpt_path=last"], "copy_resume.log")
    names = sorted(p.name for p in (copy / "checkpoints").glob("*.ckpt"))
    diff = max_difference(soak.reference, copy / "checkpoints" / "last.ckpt") if code == 0 else None
    stray = [n for n in names if n.startswith("last-v")]
    steps = [n for n in names if n.startswith("step_")]
    held = code == 0 and diff is not None and diff <= TOLERANCE and not stray
    return {
        "case": "copy",
        "stopped_at": stop_at,
        "exit_code": code,
        "checkpoints": names,
        "held": held and len(steps) <= SAVE_TOP_K,
        "max_difference_to_uninterrupted": diff,
    }


def case_extend(soak: Soak, schedule: str) -> dict[str, Any]:
    """A finished run of steps/2 extended to ``steps``, once straight and once with a kill."""
    d = soak.out / f"extend_{schedule}"
    half = soak.steps // 2
    lr = [f"lr_scheduler={schedule}"]
    if schedule != "constant":  # a decay needs a warm-up shorter than the run
        lr.append(f"lr_scheduler.warmup_steps={half // 3}")
    first = d / "first"
    cmd = [*soak.common, *lr, f"trainer.max_steps={half}", f"run_dir={first}"]
    if soak.run(cmd, f"extend_{schedule}_first.log") != 0:
        return {"case": f"extend_{schedule}", "held": False, "error": "the first run failed"}
    straight, soaked = d / "straight", d / "soaked"
    for target in (straight, soaked):
        shutil.copytree(first, target, symlinks=True)

    def extension(run_dir: Path) -> list[str]:  # the command the refusal suggests
        return [*soak.common[:2], *soak.probe_args(), f"run_dir={run_dir}", "ckpt_path=last",
                f"trainer.max_steps={soak.steps}"]  # fmt: skip

    codes = [soak.run(extension(straight), f"extend_{schedule}_straight.log")]
    kill = soak.rng.choice([signal.SIGTERM, signal.SIGKILL])
    at = soak.rng.randrange(half + 1, soak.steps - 1)
    proc, log = soak.start(extension(soaked), f"extend_{schedule}_soaked.log")
    soak.wait_step(proc, at)
    soak.stop(proc, kill)
    log.close()
    codes.append(soak.run(extension(soaked), f"extend_{schedule}_resumed.log"))
    last = {k: v / "checkpoints" / "last.ckpt" for k, v in
            {"first": first, "straight": straight, "soaked": soaked}.items()}  # fmt: skip
    if any(c != 0 for c in codes) or resume_step(soaked) != soak.steps:
        return {"case": f"extend_{schedule}", "held": False, "exit_codes": codes}
    import torch

    config = torch.load(last["straight"], map_location="cpu", weights_only=True)["ddpm_config"]
    total = config["lr_scheduler"].get("total_steps")
    rec = {
        "case": f"extend_{schedule}",
        "killed": f"{signal.Signals(kill).name} at step {at}+",
        "max_difference_soaked_to_straight": max_difference(last["straight"], last["soaked"]),
        "trained": max_difference(last["first"], last["straight"]) > 0,
        "schedule_total_steps": total,
    }
    held = rec["max_difference_soaked_to_straight"] <= TOLERANCE and rec["trained"]
    held = held and (total is None or total == soak.steps)
    if schedule == "constant":
        rec["max_difference_to_uninterrupted"] = max_difference(soak.reference, last["straight"])
        held = held and rec["max_difference_to_uninterrupted"] <= TOLERANCE
    rec["held"] = held
    return rec


def case_requeue_end(soak: Soak) -> dict[str, Any]:
    """submitit local job: SIGUSR2 mid-run, then SIGUSR2 after the final step."""
    d = soak.out / "requeue_end"
    base = [a for a in soak.common[2:] if not a.startswith("paths.root_dir")]
    cmd = [
        *soak.common[:2],
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.launcher.submitit_folder={d / 'submitit'}",
        "hydra.launcher.timeout_min=60",
        f"paths.root_dir={d}",
        *base,
        "callbacks.sample_grid.at_train_end=true",  # end-of-training work to land in
        "callbacks.sample_grid.num_samples=64",
    ]
    mid = soak.rng.randrange(soak.steps // 4, soak.steps // 2)
    proc, log = soak.start(cmd, "requeue_end.log")
    state = soak.wait_step(proc, mid)
    first_pid, signals = state.get("pid"), []
    with contextlib.suppress(ProcessLookupError, TypeError):
        os.kill(first_pid, signal.SIGUSR2)  # submitit's time-limit signal, to the job
        signals.append(f"SIGUSR2 at step {state.get('step')}")
    while proc.poll() is None:  # the requeued job resumes; wait for its final step
        state = _read_probe(soak.probe)
        if state.get("pid") not in (None, first_pid) and state.get("step", -1) >= soak.steps:
            break
        time.sleep(0.02)
    time.sleep(soak.rng.uniform(0.0, 0.3))
    with contextlib.suppress(ProcessLookupError, TypeError):
        os.kill(state.get("pid"), signal.SIGUSR2)  # during the final grid
        signals.append("SIGUSR2 after the final step")
    try:
        proc.wait(timeout=30 * 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    jobs = sorted((d / "outputs" / "train" / "multiruns").glob("*/0"))
    job = jobs[-1] if jobs else d
    launches = sorted(p.name for p in (job / "launches").glob("*")) if jobs else []
    last = job / "checkpoints" / "last.ckpt"
    diff = max_difference(soak.reference, last) if last.is_file() else None
    logs = "".join(p.read_text() for p in job.glob("launches/*/*.log"))
    rec = {
        "case": "requeue_end",
        "signals": signals,
        "sweep_exit_code": proc.returncode,
        "launch_records": launches,
        "nothing_left_to_do": "nothing left to do" in logs,
        "max_difference_to_uninterrupted": diff,
    }
    rec["held"] = (
        proc.returncode == 0
        and len(signals) == 2
        and len(launches) == 2
        and rec["nothing_left_to_do"]
        and diff is not None
        and diff <= TOLERANCE
    )
    return rec


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
        "--cases", default="", help=f"comma-separated, among {','.join(CASES)} (docstring)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu | cuda | auto: the runs' trainer.accelerator (cuda means gpu)",
    )
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    args = p.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose among {list(CASES)}")

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
    t0 = time.monotonic()
    if run_dir.exists() or any((out / c).exists() for c in cases):
        sys.exit(f"{out} holds an earlier soak: use another --out (a finished reference is reused)")
    if resume_step(reference_dir) == args.steps:
        print(f"reusing the uninterrupted reference run in {reference_dir}", flush=True)
    else:
        run_reference(common, reference_dir, out, env)
        print(f"reference: {args.steps} steps in {time.monotonic() - t0:.0f} s", flush=True)
    soak = Soak(
        out=out,
        env=env,
        common=common,
        probe=probe,
        steps=args.steps,
        rng=random.Random(args.seed),
        grace=args.grace,
        reference=reference_dir / "checkpoints" / "last.ckpt",
    )

    rounds = signal_soak(soak, args, run_dir) if args.kills > 0 else []
    finished = bool(rounds) and resume_step(run_dir) == args.steps
    final = run_dir / "checkpoints" / "last.ckpt"
    diff = max_difference(soak.reference, final) if finished else float("inf")
    kills = [r for r in rounds if r["signal"]]
    exact = finished and diff <= TOLERANCE
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

    results: list[dict[str, Any]] = []
    for case in cases:
        if case == "extend":
            results += [case_extend(soak, s) for s in SCHEDULES]
        else:
            results.append(case_copy(soak) if case == "copy" else case_requeue_end(soak))
        for rec in results[-(len(SCHEDULES) if case == "extend" else 1) :]:
            shown = {k: v for k, v in rec.items() if k not in ("case", "held")}
            print(f"case {rec['case']:<16} {'held' if rec['held'] else 'BROKE'}  {shown}")

    summary = {
        "steps": args.steps,
        "kills": len(kills),
        "by_signal": {s: sum(r["signal"] == s for r in kills) for s in SIGNALS},
        "kills_survived": len(survived),
        "max_difference_to_uninterrupted": diff if rounds else None,
        "checkpoint_load_failures": sorted({f for r in rounds for f in r["load_failures"]}),
        "wrong_resume_step": [r["round"] for r in rounds if not r["start_ok"]],
        "cases": len(results),
        "cases_held": sum(r["held"] for r in results),
        "minutes": round((time.monotonic() - t0) / 60.0, 1),
    }
    (out / "soak.json").write_text(
        json.dumps(
            {"command": common[1:], "summary": summary, "rounds": rounds, "cases": results},
            indent=2,
            default=str,
        )
        + "\n"  # fmt: skip
    )
    print()
    for k, v in summary.items():
        print(f"{k:<34} {v}")
    print(f"details: {out / 'soak.json'}")
    if rounds:
        print(
            f"{len(survived)}/{len(kills)} kills survived; max difference to the uninterrupted "
            f"run: {diff:.3g}"
        )
    if results:
        print(f"{summary['cases_held']}/{len(results)} cases held")
    ok = (not rounds or (exact and len(survived) == len(kills))) and all(r["held"] for r in results)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
