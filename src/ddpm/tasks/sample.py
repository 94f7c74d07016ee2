"""``sample(cfg)``: draw N images from a checkpoint and write ``samples.npz`` + a PNG grid.

``samples.npz`` is improved-diffusion's sample file: ``arr_0`` uint8 (N, H, W, C) (and ``arr_1``
the class labels of a class-conditional run), what ``evaluate.py samples=...`` and OpenAI's
guided-diffusion evaluator read. Sample i uses seed ``seed + i`` (EDM's convention), so the images
do not depend on the batch size or on the number of devices: with ``devices=N`` each process
draws its block of the indices, the blocks are gathered in order and rank 0 writes the file.

A class-conditional checkpoint draws sample i for class ``class_labels[i]`` when given (then
there are ``len(class_labels)`` samples), else for class ``i % K`` (balanced), with the
sampler's ``guidance_scale``; ``grid.png`` then shows one row per class.

Long jobs: the inputs are checked before any process is started; progress is a bar on a terminal
and plain lines in log files; Ctrl-C or SIGTERM stops between batches and writes what was drawn
to ``samples_partial.npz`` (with each sample's index), and the same command with
``run_dir=<that directory>`` draws only the rest: the result is the file an uninterrupted run
writes. The grid goes to the training run's W&B run (``tracker``, :mod:`ddpm.task_tracking`).
"""

from __future__ import annotations

import json
import logging
import math
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import CheckpointError, LoadedModel, load_model, read_checkpoint
from ddpm.diffusion.samplers.seeded import sample_batches
from ddpm.errors import ConfigError
from ddpm.metrics import save_npz
from ddpm.project import command
from ddpm.task_tracking import check_tracker, start_task_run
from ddpm.tasks.common import launch_dir, output_dir, write_json
from ddpm.utils.classes import balanced_labels, num_classes_of, parse_class_labels
from ddpm.utils.config_tree import print_config_tree, to_plain
from ddpm.utils.distributed import all_reduce_sum, gather_rows, rank_and_world, shard
from ddpm.utils.images import save_grid, to_uint8
from ddpm.utils.progress import Progress
from ddpm.utils.stop import StopSignals

log = logging.getLogger(__name__)


def launch(cfg: DictConfig) -> Fabric:
    """A launched Fabric from ``cfg.accelerator / devices / strategy / precision``: one process
    per device (``devices=N`` re-runs the command in N processes with a gloo/NCCL group)."""
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
    )
    fabric.launch()
    return fabric


def build_sampler(
    cfg_sampler: DictConfig | None, loaded: LoadedModel, guidance_scale: float | None = None
) -> object:
    """The sampler from ``cfg.sampler``, or the one the run was trained with; ``guidance_scale``
    (when not None) replaces its classifier-free guidance scale."""
    node = cfg_sampler if cfg_sampler is not None else loaded.config.get("sampler")
    if node is None:
        raise CheckpointError("no sampler given and none stored in the checkpoint's config")
    # The sampler group's settings that depend on the data (``clip_denoised``: not for unbounded
    # 2-D data) resolve against the data the model was trained on, as they did in training.
    raw = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    node = OmegaConf.create({"data": loaded.config.get("data", {}), "sampler": raw}).sampler
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    if guidance_scale is not None:
        if "guidance_scale" not in node:
            raise ValueError(f"guidance_scale: the sampler {node.get('_target_')} has no guidance")
        node.guidance_scale = check_guidance_scale(guidance_scale, "guidance_scale")
    elif node.get("guidance_scale") is not None:
        check_guidance_scale(node.guidance_scale, "sampler.guidance_scale")
    steps = node.get("steps")
    T = loaded.diffusion.num_timesteps
    if loaded.diffusion.discrete and steps is not None and int(steps) > T:
        raise ValueError(f"sampler.steps={steps} exceeds the model's T={T} training timesteps")
    return instantiate(node)


def check_guidance_scale(value: Any, setting: str) -> float:
    """A classifier-free guidance scale: a finite number (inf or nan would give images of only
    0 and 255)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)):
        raise ConfigError(
            f"{setting} must be a finite number (1 = plain conditional sampling, 0 = "
            f"unconditional, > 1 guides toward the class, e.g. 3), got {value!r}"
        )
    return float(value)


def requested_labels(given: Any) -> list[int] | None:
    """``class_labels`` as integers (None when not given): each must be a whole number."""
    if given is None:
        return None
    if not (OmegaConf.is_list(given) or isinstance(given, (list, tuple))):
        raise ConfigError(f"class_labels must be a list of classes, e.g. [3,3,7], got {given!r}")
    if len(given) == 0:
        raise ConfigError("class_labels is an empty list: give e.g. class_labels=[3,3,7]")
    bad = [v for v in given if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ConfigError(
            f"class_labels must be whole class indices, e.g. [3,3,7]; got {list(given)} "
            f"({bad[0]!r} is not a class index)"
        )
    return [int(v) for v in given]


def generate_batches(
    loaded: LoadedModel,
    sampler: object,
    seeds: Sequence[int],
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    class_labels: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Samples (B, *sample_shape) in model space, ``batch_size`` seeds at a time (per-sample
    seeded: the images do not depend on the batching); ``class_labels``: one per seed."""
    yield from sample_batches(
        sampler,
        loaded.net,
        loaded.diffusion,
        loaded.sample_shape,
        seeds,
        batch_size,
        device,
        class_labels,
        progress=progress,
    )


def generate(loaded: LoadedModel, *args: Any, **kwargs: Any) -> torch.Tensor:
    """All the samples :func:`generate_batches` draws (same arguments), concatenated:
    (len(seeds), *sample_shape), float32 on the CPU."""
    out = [x.float().cpu() for x in generate_batches(loaded, *args, **kwargs)]
    return torch.cat(out) if out else torch.zeros(0, *loaded.sample_shape)


def sample_labels(
    loaded: LoadedModel, n: int, class_labels: Sequence[int] | None = None
) -> torch.Tensor | None:
    """The classes of samples 0..n-1: ``class_labels`` (checked against the network's classes),
    else balanced (``i % K``) for a conditional network, else None."""
    k = num_classes_of(loaded.net)
    if class_labels is not None:
        return parse_class_labels(class_labels, k)
    return None if k is None else balanced_labels(range(n), k)


def class_grid(
    samples: torch.Tensor, labels: torch.Tensor, per_row: int = 8
) -> tuple[torch.Tensor, int]:
    """(images, images per row): the first ``per_row`` samples of each class present, one row per
    class (in class order); rows with fewer samples are padded with blank (-1) images."""
    per_row = min(per_row, int(labels.unique(return_counts=True)[1].max()))
    rows = []
    for c in labels.unique().tolist():
        row = samples[labels == c][:per_row]
        pad = samples.new_full((per_row - len(row), *samples.shape[1:]), -1.0)
        rows.append(torch.cat([row, pad]))
    return torch.cat(rows), per_row


def check_request(cfg: DictConfig) -> tuple[list[int] | None, int, int]:
    """``(class_labels, num_samples, batch_size)`` of the command, every input checked before
    any process is started (a bad one fails once, not once per device): the checkpoint can be
    read and holds a ddpm config, the labels are class indices, the guidance scale is finite."""
    if not cfg.get("ckpt_path"):
        raise CheckpointError(f"ckpt_path is required: {command('sample')} ckpt_path=PATH")
    given = requested_labels(cfg.get("class_labels"))
    n = len(given) if given is not None else int(cfg.num_samples)
    bs = int(cfg.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {n} and {bs}")
    if cfg.get("guidance_scale") is not None:
        check_guidance_scale(cfg.guidance_scale, "guidance_scale")
    check_tracker(cfg.get("tracker"))
    read_checkpoint(cfg.ckpt_path)
    return given, n, bs


PARTIAL_FILE = "samples_partial.npz"
INFO_FILE = "sample_info.json"


def _request(cfg: DictConfig, loaded: LoadedModel, sampler: object, n: int, given: Any) -> dict:
    """What a run's samples depend on: a continuation must ask for the same."""
    node = cfg.get("sampler")
    return {
        "ckpt_path": str(Path(str(cfg.ckpt_path)).resolve()),
        "num_samples": n,
        "seed_first": int(cfg.seed),
        "used_ema": loaded.used_ema,
        "ema_sigma_rel": cfg.get("ema_sigma_rel"),
        "sampler": OmegaConf.to_container(node, resolve=True)
        if node is not None
        else loaded.config.get("sampler"),
        "guidance_scale": getattr(sampler, "guidance_scale", None),  # as used
        "class_labels": "balanced (i % K)"
        if given is None and num_classes_of(loaded.net)
        else given,
    }


def _continued(out: Path, request: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(indices, samples) an interrupted launch into ``out`` drew already (none without
    ``samples_partial.npz``); refused when it asked for other samples."""
    path = out / PARTIAL_FILE
    if not path.is_file():
        return np.zeros(0, np.int64), None
    info = json.loads((out / INFO_FILE).read_text())
    differ = sorted(k for k, v in request.items() if json.loads(json.dumps(v)) != info.get(k))
    if differ:
        raise ConfigError(
            f"{path} holds samples of another request ({', '.join(differ)} differ): continue it "
            f"with the command that started it, or give another run_dir"
        )
    with np.load(path) as data:
        return data["indices"], data["arr_0"]


def continue_command(out: Path) -> str:
    """The command that continues an interrupted ``sample.py`` in ``out``."""
    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in given if not o.startswith(("run_dir=", "hydra."))]
    return " ".join([command("sample"), *kept, f"run_dir={out}"])


def _draw(
    loaded: LoadedModel,
    sampler: object,
    cfg: DictConfig,
    indices: Sequence[int],
    labels: torch.Tensor | None,
    device: torch.device,
    stop: StopSignals,
    progress: Progress,
    blocks: int,
) -> tuple[list[int], list[torch.Tensor]]:
    """This rank's ``indices`` in batches: uint8 (B, H, W, C) images or float32 (B, D) points.
    Before each of the ``blocks`` batches all ranks agree whether a stop signal arrived."""
    bs, world = int(cfg.batch_size), rank_and_world()[1]
    done: list[int] = []
    parts: list[torch.Tensor] = []
    images = len(loaded.sample_shape) == 3
    for k in range(blocks):
        flag = torch.tensor([float(stop.signum is not None)])
        if (all_reduce_sum(flag) if world > 1 else flag).item() > 0:
            break
        chunk = list(indices[k * bs : (k + 1) * bs])
        if not chunk:
            continue  # this rank's block is done; the others still agree on stopping
        y = None if labels is None else labels[chunk]
        seeds = [int(cfg.seed) + i for i in chunk]
        (x,) = sample_batches(
            sampler, loaded.net, loaded.diffusion, loaded.sample_shape, seeds, bs, device, y
        )
        parts.append(to_uint8(x).permute(0, 2, 3, 1).cpu() if images else x.float().cpu())
        done.extend(chunk)
        progress.advance(len(chunk))
    return done, parts


def _save_grid(arr: np.ndarray, labels: torch.Tensor | None, path: Path) -> None:
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if labels is not None:  # one row per class
        grid, per_row = class_grid(x, labels)
        save_grid(grid, path, nrow=per_row)
    else:
        save_grid(x[:64], path)


def sample(cfg: DictConfig) -> Path:
    """Run the sample task; returns the path of ``samples.npz``. Raises ``SystemExit`` (128 +
    signal) after writing ``samples_partial.npz`` when a stop signal ended it early."""
    given, n, bs = check_request(cfg)
    fabric = launch(cfg)
    out = output_dir(cfg)
    if fabric.is_global_zero:
        print_config_tree(cfg, launch_dir(out))
    loaded = load_model(
        cfg.ckpt_path,
        use_ema=bool(cfg.use_ema),
        sigma_rel=cfg.get("ema_sigma_rel"),
        device=fabric.device,
    )
    sampler = build_sampler(cfg.get("sampler"), loaded, cfg.get("guidance_scale"))
    labels = sample_labels(loaded, n, given)
    request = _request(cfg, loaded, sampler, n, given)
    old_idx, old_x = _continued(out, request)
    todo = np.setdiff1d(np.arange(n), old_idx)
    mine = shard(len(todo))
    block = todo[mine.start : mine.stop].tolist()
    world = fabric.world_size
    largest = -(-len(todo) // world)  # the largest block
    blocks = -(-largest // bs)  # its batches
    if len(old_idx) and fabric.is_global_zero:
        log.info(
            "continuing %s: %d of %d samples drawn already", out / PARTIAL_FILE, len(old_idx), n
        )
    desc = "sampling" if world == 1 else f"sampling (rank 0 of {world})"
    show = bool(cfg.progress) and fabric.is_global_zero
    with StopSignals() as stop, Progress(len(block), desc, "images", enabled=show) as progress:
        with fabric.autocast():
            done, parts = _draw(
                loaded, sampler, cfg, block, labels, fabric.device, stop, progress, blocks
            )
    c, *rest = loaded.sample_shape
    images = len(loaded.sample_shape) == 3
    empty = torch.zeros(0, *rest, c, dtype=torch.uint8) if images else torch.zeros(0, c)
    new_x = gather_rows(torch.cat(parts) if parts else empty).numpy()
    new_idx = gather_rows(torch.tensor(done, dtype=torch.long)).numpy()
    idx = np.concatenate([old_idx, new_idx])
    arr = new_x if old_x is None else np.concatenate([old_x, new_x])
    order = np.argsort(idx, kind="stable")
    idx, arr = idx[order], arr[order]
    path = out / ("samples.npz" if len(idx) == n else PARTIAL_FILE)
    if fabric.global_rank == 0:
        y = None if labels is None else labels[torch.from_numpy(idx)]
        info = {**request, "shape": list(arr.shape), "dtype": str(arr.dtype), "devices": world}
        info["global_step"] = loaded.global_step
        if len(idx) < n:
            save_npz(path, arr, None if y is None else y.numpy(), indices=idx)
            write_json(out / INFO_FILE, {**info, "partial": True})
            log.warning(
                "sample.py stopped by %s after %d of %d samples: wrote %s (those samples and "
                "their indices). Continue with: %s",
                stop.name or "a stop signal on another rank",
                len(idx),
                n,
                path,
                continue_command(out),
            )
        else:
            save_npz(path, arr, None if y is None else y.numpy())
            if images:
                _save_grid(arr, y, out / "grid.png")
            write_json(out / INFO_FILE, info)
            (out / PARTIAL_FILE).unlink(missing_ok=True)  # superseded by samples.npz
            _track(cfg, loaded, out)
            print(path)
    fabric.barrier()
    if len(idx) < n:
        raise SystemExit(128 + (stop.signum or signal.SIGINT))
    return path


def _track(cfg: DictConfig, loaded: LoadedModel, out: Path) -> None:
    """The grid into the training run's W&B run (``tracker``)."""
    run = start_task_run(
        cfg.get("tracker"), "sample", cfg.ckpt_path, loaded.global_step, to_plain(cfg), out
    )
    if run is None:
        return
    if (out / "grid.png").is_file():
        run.log_image("samples", out / "grid.png")
    run.finish()
