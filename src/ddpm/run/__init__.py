"""Run bookkeeping: what happens when a training run is killed and restarted.

A run lives in one directory (``run_dir``): its record (``.hydra/``, ``train.log``, ``run.json``),
``checkpoints/`` and ``metrics.json``. Everything that keeps a run whole across kills, restarts
and requeues is here or named here.

While it trains
    * Randomness is a function of position (:mod:`ddpm.utils.seeding`): the timesteps, noise and
      dropout of a micro-batch come from streams seeded by (seed, rank, epoch, batch); data order
      from a permutation seeded by (seed, epoch), sharded by rank
      (:class:`ddpm.data.order.EpochShuffleOrder`); random flips from (seed, epoch, rank,
      batch), drawn in the training process after the DataLoader's workers
      (:class:`ddpm.data.order.ResumableDataLoader`). No RNG state needs saving: a resumed run
      draws what the uninterrupted one drew, with any number of workers.
    * Checkpoints are written atomically (:mod:`ddpm.callbacks.atomic_checkpoint`) and always
      inside the training loop, including the final step's ``last.ckpt``; they hold the weights,
      EMA, optimizer and LR-schedule state, loop counters, the loader's position in the epoch,
      the importance sampler's history and the resolved run config (:mod:`ddpm.checkpoint`).

When it is stopped
    * SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (:mod:`ddpm.callbacks.preemption`): the step in flight
      finishes, all ranks agree, ``last.ckpt`` is written, the process exits with 128 + signal.
      A signal during end-of-training work (final validation, sample grids) stops at once.
    * Requeue (:mod:`ddpm.run.requeue`): exactly one mechanism requeues, the one that was in
      charge of the signal: submitit on SIGUSR2 (``hydra/launcher=slurm``), ``scontrol requeue``
      in place of Lightning's SLURM handler on SIGUSR1; nothing otherwise.
    * SIGKILL, a crash, a node failure: the newest complete checkpoint stays loadable (at worst a
      stale ``*.partial`` is left and removed on the next start); the steps since are redone.

When it is started again (:func:`ddpm.run.launch.start_launch`), before anything is written
    0. Rank 0 takes the directory's lock (:mod:`ddpm.run.lock`, one live process per run, on
       every OS), so what it resumes is read from a directory no other process writes.
    1. ``ckpt_path=last|auto|<file>`` is resolved to a loadable checkpoint, or fails clearly
       (:mod:`ddpm.run.checkpoint_files`). A scheduler job whose run directory records its own
       job id (a requeued job) resumes from its newest checkpoint without being asked; any other launch
       into a directory holding checkpoints without ``ckpt_path`` is refused
       (:mod:`ddpm.run.directory`).
    2. The run's own config is restored from the checkpoint; the command may change only when
       to stop, cadences, logging, paths and devices, else it is refused listing the differences
       (``resume_overrides=force`` overrides). A finished run says how to extend it (a decaying
       LR schedule is rebuilt over the new length, :mod:`ddpm.lr_schedules`); a job requeued
       into a finished run does nothing and succeeds; a network that does not fit the weights is
       refused by name (:mod:`ddpm.run.resume`). Every sampler the run uses is checked against
       its process (:func:`ddpm.config.sampler_problems`).
    3. Hydra keeps each later launch's own record apart (``launches/<time>/``, each requeue its
       own), so a refused or resumed launch never rewrites the run's record.
    4. Rank 0 records the scheduler job, removes stale ``*.partial`` files and continues the W&B
       run; Lightning restores the rest. The checkpoint callback takes its files by name in its
       own directory, so a copied run directory rotates its own checkpoints
       (:class:`ddpm.callbacks.atomic_checkpoint.AtomicModelCheckpoint`).
"""

from __future__ import annotations

import os

from ddpm.project import command


def resume_command(run_dir: str | os.PathLike, *overrides: str, ckpt_path: str = "last") -> str:
    """The command that continues the run in ``run_dir`` (from its newest checkpoint, or from
    ``ckpt_path``), with further ``key=value`` ``overrides``: the one spelling every message
    that says how to resume uses."""
    return " ".join([command("train"), f"run_dir={run_dir}", f"ckpt_path={ckpt_path}", *overrides])
