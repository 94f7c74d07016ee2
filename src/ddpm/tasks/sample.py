"""``sample(cfg)``: draw N images from a checkpoint and write ``samples.npz`` + a PNG grid.

``samples.npz`` is improved-diffusion's sample file: ``arr_0`` uint8 (N, H, W, C) (and ``arr_1``
the class labels of a class-conditional run), what ``evaluate.py samples=...`` and OpenAI's
guided-diffusion evaluator read. Sample i uses seed ``seed + i`` (EDM's convention), so the images
do not depend on the batch size or on the number of devices: with ``devices=N`` each process
draws its block of the indices, the blocks are gathered in order and rank 0 writes the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import CheckpointError, LoadedModel, load_model
from ddpm.metrics import gather_rows, save_npz, shard
from ddpm.tasks.common import output_dir, write_json
from ddpm.utils.images import save_grid, to_uint8
from ddpm.utils.seeding import PerSampleGenerator

log = logging.getLogger(__name__)


def launch(cfg: DictConfig):  # -> lightning_fabric.Fabric
    """A launched Fabric from ``cfg.accelerator / devices / strategy / precision``: one process
    per device (``devices=N`` re-runs the command in N processes with a gloo/NCCL group)."""
    from lightning_fabric import Fabric

    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
    )
    fabric.launch()
    return fabric


def build_sampler(cfg_sampler: DictConfig | None, loaded: LoadedModel) -> object:
    """The sampler from ``cfg.sampler``, or the one the run was trained with."""
    node = cfg_sampler if cfg_sampler is not None else loaded.config.get("sampler")
    if node is None:
        raise CheckpointError("no sampler given and none stored in the checkpoint's config")
    # The sampler group's settings that depend on the data (``clip_denoised``: not for unbounded
    # 2-D data) resolve against the data the model was trained on, as they did in training.
    raw = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    node = OmegaConf.create({"data": loaded.config.get("data", {}), "sampler": raw}).sampler
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    steps = node.get("steps")
    T = loaded.diffusion.num_timesteps
    if steps is not None and int(steps) > T:
        raise ValueError(f"sampler.steps={steps} exceeds the model's T={T} training timesteps")
    return instantiate(node)


def generate_batches(
    loaded: LoadedModel,
    sampler: object,
    seeds: Sequence[int],
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Samples (B, *sample_shape) in model space, ``batch_size`` seeds at a time (per-sample
    seeded: the images do not depend on the batching)."""
    seeds = list(seeds)
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i : i + batch_size]
        with torch.inference_mode():
            yield sampler(
                loaded.net,
                loaded.diffusion,
                (len(chunk), *loaded.sample_shape),
                generator=PerSampleGenerator(chunk, device=device),
                progress=progress,
                device=device,
            )


def generate(
    loaded: LoadedModel,
    sampler: object,
    seeds: list[int],
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> torch.Tensor:
    """All the samples of ``seeds`` (len(seeds), *sample_shape), float32 on the CPU."""
    out = [
        x.float().cpu()
        for x in generate_batches(loaded, sampler, seeds, batch_size, device, progress)
    ]
    return torch.cat(out) if out else torch.zeros(0, *loaded.sample_shape)


def sample(cfg: DictConfig) -> Path:
    """Run the sample task; returns the path of ``samples.npz``."""
    if not cfg.get("ckpt_path"):
        raise CheckpointError("ckpt_path is required: python src/sample.py ckpt_path=PATH")
    n, bs = int(cfg.num_samples), int(cfg.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {n} and {bs}")
    fabric = launch(cfg)
    loaded = load_model(cfg.ckpt_path, use_ema=bool(cfg.use_ema), device=fabric.device)
    sampler = build_sampler(cfg.get("sampler"), loaded)
    images = len(loaded.sample_shape) == 3
    seeds = [int(cfg.seed) + i for i in shard(n)]
    parts = []
    with fabric.autocast():
        for x in generate_batches(
            loaded, sampler, seeds, bs, fabric.device, bool(cfg.progress) and fabric.is_global_zero
        ):
            # images: uint8 (B, H, W, C); 2-D points: float32 (B, D)
            parts.append(to_uint8(x).permute(0, 2, 3, 1).cpu() if images else x.float().cpu())
    c, *rest = loaded.sample_shape
    empty = torch.zeros(0, *rest, c, dtype=torch.uint8) if images else torch.zeros(0, c)
    arr = gather_rows(torch.cat(parts) if parts else empty).numpy()
    out = output_dir(cfg)
    path = out / "samples.npz"
    if fabric.global_rank == 0:
        save_npz(path, arr)
        if images:
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
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "devices": fabric.world_size,
            },
        )
        print(path)
    fabric.barrier()
    return path
