"""``sample(cfg)``: draw N images from a checkpoint and write ``samples.npz`` + a PNG grid.

``samples.npz`` holds ``arr_0``: uint8 (N, H, W, C), the layout OpenAI's guided-diffusion
evaluator (and others) read. Sample i uses seed ``seed + i`` (EDM's convention), so the images do
not depend on the batch size or on the number of devices; with several devices each rank draws
its share of the seeds and rank 0 writes the file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import CheckpointError, LoadedModel, load_model
from ddpm.tasks.common import output_dir, write_json
from ddpm.utils.seeding import PerSampleGenerator

log = logging.getLogger(__name__)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounding like guided-diffusion."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def build_sampler(cfg_sampler: DictConfig | None, loaded: LoadedModel) -> object:
    """The sampler from ``cfg.sampler``, or the one the run was trained with."""
    node = cfg_sampler if cfg_sampler is not None else loaded.config.get("sampler")
    if node is None:
        raise CheckpointError("no sampler given and none stored in the checkpoint's config")
    node = OmegaConf.create(
        OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    )
    if loaded.config.get("data", {}).get("clip_denoised") is False and "clip_denoised" in node:
        node.clip_denoised = False  # unbounded data (2-D toy sets): never clip x̂₀
    steps = node.get("steps")
    T = loaded.diffusion.num_timesteps
    if steps is not None and int(steps) > T:
        raise ValueError(f"sampler.steps={steps} exceeds the model's T={T} training timesteps")
    return instantiate(node)


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    sampler: object,
    seeds: list[int],
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> torch.Tensor:
    """Images (len(seeds), *sample_shape) in [-1, 1], batch by batch, per-sample seeded."""
    out = []
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i : i + batch_size]
        gen = PerSampleGenerator(chunk, device=device)
        x = sampler(
            loaded.net,
            loaded.diffusion,
            (len(chunk), *loaded.sample_shape),
            generator=gen,
            progress=progress,
            device=device,
        )
        out.append(x.float().cpu())
    if not out:
        return torch.zeros(0, *loaded.sample_shape)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, max_images: int = 64) -> None:
    """A square grid PNG of the first ``max_images`` images in [-1, 1]."""
    from torchvision.utils import save_image

    x = images[:max_images]
    nrow = max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    save_image((x + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)


def sample(cfg: DictConfig) -> Path:
    """Run the sample task; returns the path of ``samples.npz``."""
    if not cfg.get("ckpt_path"):
        raise CheckpointError("ckpt_path is required: python src/sample.py ckpt_path=PATH")
    n, bs = int(cfg.num_samples), int(cfg.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {n} and {bs}")

    from lightning_fabric import Fabric

    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
    )
    fabric.launch()
    loaded = load_model(cfg.ckpt_path, use_ema=bool(cfg.use_ema), device=fabric.device)
    sampler = build_sampler(cfg.get("sampler"), loaded)
    rank, world = fabric.global_rank, fabric.world_size
    seeds = [int(cfg.seed) + i for i in range(rank, n, world)]
    with fabric.autocast():
        x = generate(
            loaded, sampler, seeds, bs, fabric.device, progress=bool(cfg.progress) and rank == 0
        )
    if world > 1:
        # pad to equal length, gather, then restore the global order i = rank + k * world
        per = math.ceil(n / world)
        padded = torch.zeros(per, *x.shape[1:])
        padded[: x.shape[0]] = x
        gathered = fabric.all_gather(padded.to(fabric.device)).cpu()  # (world, per, ...)
        x = gathered.transpose(0, 1).reshape(per * world, *x.shape[1:])[:n]
    out = output_dir(cfg)
    path = out / "samples.npz"
    if fabric.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if x.ndim == 4:
            arr = to_uint8(x).numpy()
            save_grid(x, out / "grid.png")
        else:  # 2-D points: float32 (N, D)
            arr = x.numpy().astype(np.float32)
        tmp = out / "samples.partial.npz"
        np.savez(tmp, arr_0=arr)
        tmp.replace(path)
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
            },
        )
        print(path)
    fabric.barrier()
    return path
