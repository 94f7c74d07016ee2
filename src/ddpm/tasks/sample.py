"""``sample(cfg)``: draw N images from a checkpoint and write ``samples.npz`` + a PNG grid.

``samples.npz`` is improved-diffusion's sample file: ``arr_0`` uint8 (N, H, W, C) (and ``arr_1``
the class labels of a class-conditional run), what ``evaluate.py samples=...`` and OpenAI's
guided-diffusion evaluator read. Sample i uses seed ``seed + i`` (EDM's convention), so the images
do not depend on the batch size or on the number of devices: with ``devices=N`` each process
draws its block of the indices, the blocks are gathered in order and rank 0 writes the file.

A class-conditional checkpoint draws sample i for class ``class_labels[i]`` when given (then
there are ``len(class_labels)`` samples), else for class ``i % K`` (balanced), with the
sampler's ``guidance_scale``; ``grid.png`` then shows one row per class.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import CheckpointError, LoadedModel, load_model
from ddpm.diffusion.samplers.seeded import sample_batches
from ddpm.metrics import save_npz
from ddpm.tasks.common import output_dir, write_json
from ddpm.utils.classes import balanced_labels, num_classes_of, parse_class_labels
from ddpm.utils.distributed import gather_rows, shard
from ddpm.utils.images import save_grid, to_uint8

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
        node.guidance_scale = float(guidance_scale)
    steps = node.get("steps")
    T = loaded.diffusion.num_timesteps
    if loaded.diffusion.discrete and steps is not None and int(steps) > T:
        raise ValueError(f"sampler.steps={steps} exceeds the model's T={T} training timesteps")
    return instantiate(node)


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


def sample(cfg: DictConfig) -> Path:
    """Run the sample task; returns the path of ``samples.npz``."""
    if not cfg.get("ckpt_path"):
        raise CheckpointError("ckpt_path is required: python src/sample.py ckpt_path=PATH")
    given = cfg.get("class_labels")
    if given is not None and (OmegaConf.is_list(given) or isinstance(given, (list, tuple))):
        given = [int(v) for v in given]
        if not given:
            raise ValueError("class_labels is an empty list: give e.g. class_labels=[3,3,7]")
    elif given is not None:
        raise ValueError(f"class_labels must be a list of classes, e.g. [3,3,7], got {given!r}")
    n = len(given) if given is not None else int(cfg.num_samples)
    bs = int(cfg.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {n} and {bs}")
    fabric = launch(cfg)
    loaded = load_model(cfg.ckpt_path, use_ema=bool(cfg.use_ema), device=fabric.device)
    sampler = build_sampler(cfg.get("sampler"), loaded, cfg.get("guidance_scale"))
    labels = sample_labels(loaded, n, given)
    images = len(loaded.sample_shape) == 3
    block = shard(n)
    seeds = [int(cfg.seed) + i for i in block]
    mine = None if labels is None else labels[block.start : block.stop]
    parts = []
    with fabric.autocast():
        for x in generate_batches(
            loaded,
            sampler,
            seeds,
            bs,
            fabric.device,
            bool(cfg.progress) and fabric.is_global_zero,
            class_labels=mine,
        ):
            # images: uint8 (B, H, W, C); 2-D points: float32 (B, D)
            parts.append(to_uint8(x).permute(0, 2, 3, 1).cpu() if images else x.float().cpu())
    c, *rest = loaded.sample_shape
    empty = torch.zeros(0, *rest, c, dtype=torch.uint8) if images else torch.zeros(0, c)
    arr = gather_rows(torch.cat(parts) if parts else empty).numpy()
    out = output_dir(cfg)
    path = out / "samples.npz"
    if fabric.global_rank == 0:
        save_npz(path, arr, None if labels is None else labels.numpy())
        if images and labels is not None:  # one row per class
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            grid, per_row = class_grid(x, labels)
            save_grid(grid, out / "grid.png", nrow=per_row)
        elif images:
            grid = torch.from_numpy(arr[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            save_grid(grid, out / "grid.png")
        write_json(
            out / "sample_info.json",
            {
                "ckpt_path": str(cfg.ckpt_path),
                "num_samples": n,
                "seed_first": int(cfg.seed),
                "used_ema": loaded.used_ema,
                "global_step": loaded.global_step,
                "sampler": OmegaConf.to_container(cfg.sampler, resolve=True)
                if cfg.get("sampler") is not None
                else loaded.config.get("sampler"),
                "guidance_scale": getattr(sampler, "guidance_scale", None),  # as used
                "shape": list(arr.shape),
                "class_labels": "balanced (i % K)"
                if labels is not None and given is None
                else given,
                "dtype": str(arr.dtype),
                "devices": fabric.world_size,
            },
        )
        print(path)
    fabric.barrier()
    return path
