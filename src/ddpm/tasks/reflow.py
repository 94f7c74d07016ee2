"""``reflow(cfg)``: rectified flow's reflow (Liu et al. 2023, "Flow straight and fast", Alg. 1).

1. The teacher (``teacher=CKPT``, a flow-matching model: objective=flow_matching,
   schedule=rectified_flow) gives the run its network, process, objective and data
   (:data:`TEACHER_SECTIONS`; ``data.*`` overrides on the command line still apply).
2. Its deterministic sampler (``reflow.sampler``, Euler with 100 steps by default) maps
   ``reflow.num_pairs`` noises z to samples x = ODE(z), written in chunks under
   ``<run>/reflow/`` (chunk i's noise is seeded by (``reflow.seed``, i): an interrupted generation
   continues where it stopped) and then as ``<run>/reflow/pairs.pt``. A class-conditional
   teacher maps each z with a label y drawn uniformly over its classes, seeded alike, to
   x = ODE(z | y) (with the sampler's classifier-free guidance), and the pairs keep y. Ranks
   started at once (torchrun, srun: :func:`~ddpm.utils.distributed.external_launch`) share the
   chunks (a rank waits at most ``reflow.wait_timeout_s`` for the others'); under Lightning's own
   launcher rank 0 makes them before the others start. The pairs are made on the device the run
   trains on (``trainer.accelerator`` / ``devices``: :func:`~ddpm.utils.devices.run_device`).
3. A normal training run (:func:`ddpm.tasks.train.train`: checkpoints, EMA, resume, grids, W&B)
   starts from the teacher's weights (``init_from``) and trains on the pairs
   (``data.pairs``): x_t = (1 - t) x + t z, target z - x (conditioned on y, with label dropout).
4. The straightness S of the teacher's and the student's paths (the same seeded noises and
   labels) is logged (``val/straightness``, :class:`~ddpm.callbacks.straightness.Straightness`), and
   written with the pairs' own to ``<run>/reflow/straightness.json``.

Resume an interrupted reflow with the same command and ``run_dir=<run> ckpt_path=auto``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.callbacks.straightness import METRIC
from ddpm.checkpoint import LoadedModel, load_model
from ddpm.config import DERIVED_KEYS
from ddpm.data.pairs import LABELS_KEY, PAIR_KEYS, load_pairs, save_pairs
from ddpm.diffusion import RectifiedFlow
from ddpm.diffusion.reflow import chunk_sizes, mean_straightness, seeded_pairs
from ddpm.errors import ConfigError
from ddpm.tasks.common import output_dir, write_json
from ddpm.tasks.train import train
from ddpm.utils.classes import num_classes_of
from ddpm.utils.devices import run_device
from ddpm.utils.distributed import external_launch, is_launch_rank_zero

log = logging.getLogger(__name__)

# what the student takes from its teacher (the network must be the teacher's to start from it)
TEACHER_SECTIONS = ("model", "schedule", "diffusion", "objective", "data")
PAIRS_DIR = "reflow"
WAIT_SECONDS = 1.0  # how often a rank looks for the files other ranks write


def check_teacher(loaded: LoadedModel, path: str) -> None:
    """A ConfigError unless ``loaded`` is a flow-matching model (unconditional or
    class-conditional)."""
    process = loaded.diffusion
    if not isinstance(process, RectifiedFlow) or process.prediction_type != "velocity":
        schedule = loaded.config.get("schedule", {}).get("name", type(process).__name__)
        raise ConfigError(
            f"teacher={path} is not a flow-matching model (schedule={schedule}, prediction_type="
            f"{process.prediction_type}): reflow needs one trained with objective=flow_matching "
            "schedule=rectified_flow"
        )


def _data_overrides() -> list[tuple[str, Any]]:
    """The command line's ``data.KEY=VALUE`` overrides, applied over the teacher's data."""
    if not HydraConfig.initialized():
        return []
    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [
        (o.key_or_group, o.value())
        for o in parsed
        if o.key_or_group.startswith("data.") and not o.is_delete() and not o.is_sweep_override()
    ]


def _rederive(cfg: DictConfig) -> None:
    """The derived keys (:data:`ddpm.config.DERIVED_KEYS`) of adopted, resolved sections back as
    interpolations of their owners (T is ``schedule.num_timesteps``, ...), as composing made them."""
    for path, owners in DERIVED_KEYS.items():
        node = OmegaConf.select(cfg, path, default=None)
        if node is None:
            continue
        if not OmegaConf.is_dict(node):  # a leaf with one owner
            OmegaConf.update(cfg, path, f"${{{owners}}}")
            continue
        for k in [k for k in node if k != "_target_"]:  # a node built from groups' keys
            found = [g for g in owners.split(" / ") if k in (OmegaConf.select(cfg, g) or {})]
            if found:
                node[k] = f"${{{found[0]}.{k}}}"


def adopt_teacher(cfg: DictConfig, loaded: LoadedModel, pairs: Path) -> None:
    """The teacher's :data:`TEACHER_SECTIONS` into ``cfg``, and the pairs as the training data."""
    stored = loaded.config
    with open_dict(cfg):
        for key in TEACHER_SECTIONS:
            cfg[key] = OmegaConf.create(stored[key])
        _rederive(cfg)
        for key, value in _data_overrides():
            OmegaConf.update(cfg, key, value, force_add=True)
        cfg.data.pairs = str(pairs)


def _request(cfg: DictConfig) -> dict[str, Any]:
    sampler = OmegaConf.to_container(cfg.reflow.sampler, resolve=True)
    return {
        "teacher": os.path.abspath(str(cfg.teacher)),
        "num_pairs": int(cfg.reflow.num_pairs),
        "batch_size": int(cfg.reflow.batch_size),
        "seed": int(cfg.reflow.seed),
        "sampler": sampler,
    }


def _chunk_path(chunks: Path, i: int) -> Path:
    return chunks / f"{i:05d}.pt"


def _stored_straightness(final: Path) -> float:
    return float(torch.load(final, map_location="cpu", weights_only=True)["straightness"])


def make_pairs(
    loaded: LoadedModel,
    sampler: Any,
    out: Path,
    request: dict[str, Any],
    rank: int = 0,
    world: int = 1,
    timeout_s: float | None = None,
) -> float:
    """Write the teacher's (x = ODE(z), z) pairs (with the label y of each, x = ODE(z | y), for
    a class-conditional teacher) to ``out/pairs.pt`` chunk by chunk (kept under ``out/chunks/``
    until all are made); returns the mean straightness of their paths.

    Rank ``rank`` of ``world`` processes started at once makes chunks i ≡ rank (mod world);
    rank 0 waits for all, writes ``pairs.pt``, and the others wait for it: chunk i is seeded by
    (seed, i) alone, so the pairs are the same in any number of processes. A rank that waits
    longer than ``timeout_s`` (None: forever) for another's files raises :class:`PairsTimeout`.
    The pairs are made on the teacher's device and written on the CPU."""
    final = out / "pairs.pt"
    recorded = out / "request.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != request:
        raise ConfigError(
            f"{out} holds reflow pairs made with other settings ({recorded}); start a new run "
            "(no run_dir) or repeat those settings"
        )
    if final.is_file():
        return _stored_straightness(final)
    chunks = out / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(recorded, request)
    num_classes = num_classes_of(loaded.net)
    sizes = chunk_sizes(request["num_pairs"], request["batch_size"])
    for i in range(rank, len(sizes), world):
        path = _chunk_path(chunks, i)
        if path.is_file():
            continue
        x, z, y, s = seeded_pairs(
            loaded.net, loaded.diffusion, sampler, sizes[i], loaded.sample_shape, request["seed"], i
        )
        save_pairs(path, x, z, y, straightness_sum=float(s.sum()))
        log.info("reflow pairs: chunk %d/%d (%d pairs)", i + 1, len(sizes), sizes[i])
    if rank != 0:
        wait_for_pairs(out, len(sizes), world, timeout_s)
        return _stored_straightness(final)
    wait_for_pairs(out, len(sizes), world, timeout_s, chunks_only=True)  # chunk i: rank i % world
    paths = [_chunk_path(chunks, i) for i in range(len(sizes))]
    parts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    s_pairs = sum(float(c["straightness_sum"]) for c in parts) / request["num_pairs"]
    x, z = (torch.cat([c[k] for c in parts]) for k in PAIR_KEYS)
    y = torch.cat([c[LABELS_KEY] for c in parts]) if num_classes is not None else None
    save_pairs(final, x, z, y, straightness=s_pairs)
    for path in paths:
        path.unlink(missing_ok=True)
    chunks.rmdir()
    return s_pairs


class PairsTimeout(TimeoutError):
    """A rank waited longer than ``reflow.wait_timeout_s`` for the pairs other ranks make."""


def wait_for_pairs(
    out: Path, num_chunks: int, world: int, timeout_s: float | None, chunks_only: bool = False
) -> None:
    """Wait for ``out/pairs.pt`` (or, with ``chunks_only``, for its ``num_chunks`` chunks), written
    by other ranks of a launch that starts every rank at once; after ``timeout_s`` seconds
    (None: never) a :class:`PairsTimeout` names the chunks missing, the ranks that were to make
    them, and how to resume (a rank may have died: srun without --kill-on-bad-exit)."""
    final, chunks = out / "pairs.pt", out / "chunks"
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)

    def missing() -> list[int]:
        return [i for i in range(num_chunks) if not _chunk_path(chunks, i).is_file()]

    while missing() if chunks_only else not final.is_file():
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            lost = missing()
            what = (
                f"chunks {lost} of {num_chunks} are missing (made by ranks "
                f"{sorted({i % world for i in lost})} of {world})"
                if lost
                else f"every chunk is made, but rank 0 wrote no {final.name}"
            )
            raise PairsTimeout(
                f"waited reflow.wait_timeout_s={timeout_s} s for the reflow pairs under {out}: "
                f"{what}; did a rank die? Resume with the same command and "
                f"run_dir={out.parent} ckpt_path=auto (the {num_chunks - len(lost)} chunks made "
                "are kept)"
            )
        time.sleep(WAIT_SECONDS if left is None else min(WAIT_SECONDS, left))


def reflow(cfg: DictConfig) -> dict[str, float]:
    """Reflow the teacher (module docstring); returns the training metrics with the
    straightness of the teacher (``reflow/straightness_teacher``) and of the pairs' paths."""
    if cfg.get("teacher") is None:
        if cfg.get("ckpt_path") is None:
            raise ConfigError(
                "teacher=PATH: the flow-matching checkpoint to reflow (objective=flow_matching "
                "schedule=rectified_flow); or run_dir=<reflow run> ckpt_path=last to resume one"
            )
        return train(cfg)  # a resume: the run's own config (teacher, pairs) is restored
    run_dir = output_dir(cfg)
    out = run_dir / PAIRS_DIR
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    timeout = cfg.reflow.get("wait_timeout_s")
    seconds = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    if timeout is not None and not (seconds and timeout >= 0):
        raise ConfigError(f"reflow.wait_timeout_s must be seconds >= 0 or null, got {timeout!r}")
    trainer = cfg.get("trainer") or {}
    device = run_device(trainer.get("accelerator"), trainer.get("devices"), "trainer.accelerator")
    loaded = load_model(cfg.teacher, device=device)  # the pairs are made where the run trains
    check_teacher(loaded, str(cfg.teacher))
    adopt_teacher(cfg, loaded, out / "pairs.pt")
    sampler = instantiate(cfg.reflow.sampler)
    report_path = out / "straightness.json"
    rank, world = external_launch() or (0, 1)
    num_chunks = len(chunk_sizes(int(cfg.reflow.num_pairs), int(cfg.reflow.batch_size)))
    s_pairs = s_teacher = float("nan")
    if world > 1 or is_launch_rank_zero():  # rank 0, or each of the ranks started at once
        out.mkdir(parents=True, exist_ok=True)
        s_pairs = make_pairs(loaded, sampler, out, _request(cfg), rank, world, timeout)
    else:  # a rank Lightning starts at fit: rank 0 made the pairs before
        wait_for_pairs(out, num_chunks, 1, timeout)
    if is_launch_rank_zero():
        s_teacher = mean_straightness(
            loaded.net, loaded.diffusion, sampler, loaded.sample_shape,
            int(cfg.reflow.eval_samples), int(cfg.reflow.eval_seed), int(cfg.reflow.batch_size),
        )  # fmt: skip
        log.info("straightness: teacher %.5f (its %d pairs' paths: %.5f)", s_teacher,
                 int(cfg.reflow.num_pairs), s_pairs)  # fmt: skip
    # readable, with labels just when the teacher is class-conditional, before the run starts
    load_pairs(out / "pairs.pt", loaded.sample_shape, num_classes_of(loaded.net))
    del loaded
    metrics = train(cfg)
    metrics["reflow/straightness_teacher"] = s_teacher
    metrics["reflow/straightness_pairs"] = s_pairs
    if is_launch_rank_zero():
        report = {"teacher": s_teacher, "pairs": s_pairs, "student": metrics.get(METRIC)}
        report["global_step"] = metrics.get("global_step")
        write_json(report_path, report)
        log.info("straightness: teacher %.5f -> student %s (%s)", s_teacher,
                 report["student"], report_path)  # fmt: skip
    return metrics
