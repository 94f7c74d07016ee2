"""``evaluate(cfg)``: NLL in bits/dim (exact bound) on the test split, and FID/IS of samples when
the Inception weights are available; writes and prints ``metrics.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import CheckpointError, LoadedModel, load_model
from ddpm.diffusion import calc_bpd_loop
from ddpm.tasks.common import output_dir, write_json

log = logging.getLogger(__name__)


def build_datamodule(loaded: LoadedModel, cfg: DictConfig) -> Any:
    """The run's data module from the stored config (``data_root`` overrides its root)."""
    data = dict(loaded.config["data"])
    if cfg.get("data_root"):
        data["root"] = str(cfg.data_root)
    if "random_flip" in data:
        data["random_flip"] = False
    if cfg.get("batch_size"):
        data["batch_size"] = int(cfg.batch_size)
        data["val_batch_size"] = int(cfg.batch_size)
    dm = instantiate(OmegaConf.create(data))
    dm.setup("test")
    return dm


@torch.inference_mode()
def nll_bpd(
    loaded: LoadedModel,
    loader: Any,
    num_images: int | None,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Mean bound (bits/dim) and its breakdown over the first ``num_images`` test images."""
    g = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {"total": 0.0, "prior": 0.0, "decoder": 0.0, "vb": 0.0}
    n = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if num_images is not None:
            x = x[: max(0, num_images - n)]
        if x.shape[0] == 0:
            break
        out = calc_bpd_loop(
            loaded.diffusion, loaded.net, x.to(device), generator=g, progress=progress
        )
        totals["total"] += float(out["total_bpd"].sum())
        totals["prior"] += float(out["prior_bpd"].sum())
        totals["decoder"] += float(out["vb"][:, 0].sum())
        totals["vb"] += float(out["vb"][:, 1:].sum())
        n += x.shape[0]
        if num_images is not None and n >= num_images:
            break
    if n == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    return {
        "test/nll_bpd": totals["total"] / n,
        "test/nll_prior_bpd": totals["prior"] / n,
        "test/nll_decoder_bpd": totals["decoder"] / n,
        "test/nll_vb_bpd": totals["vb"] / n,
        "test/nll_num_images": float(n),
    }


def point_cloud_metrics(
    loaded: LoadedModel, dm: Any, cfg: DictConfig, device: torch.device
) -> dict[str, float]:
    """Energy distance and MMD between samples and the test points (2-D playground)."""
    from ddpm.metrics.distances import distribution_distances
    from ddpm.tasks.sample import build_sampler, generate

    ref = torch.cat([b[0] if isinstance(b, (list, tuple)) else b for b in dm.test_dataloader()])
    n = min(len(ref), int(cfg.fid.num_samples))
    x = generate(
        loaded,
        build_sampler(cfg.get("sampler"), loaded),
        [int(cfg.seed) + i for i in range(n)],
        int(cfg.batch_size),
        device,
    )
    return {f"test/{k}": v for k, v in distribution_distances(x, ref[:n]).items()}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the evaluate task; returns the metrics written to ``metrics.json``."""
    if not cfg.get("ckpt_path"):
        raise CheckpointError("ckpt_path is required: python src/evaluate.py ckpt_path=PATH")
    device = torch.device(
        cfg.device
        if cfg.get("device") not in (None, "auto")
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    loaded = load_model(cfg.ckpt_path, use_ema=bool(cfg.use_ema), device=device)
    metrics: dict[str, float] = {"global_step": float(loaded.global_step)}
    dm = build_datamodule(loaded, cfg)
    if len(loaded.sample_shape) == 1:  # 2-D toy data: continuous, so no bits/dim; distances
        metrics.update(point_cloud_metrics(loaded, dm, cfg, device))
    elif cfg.nll.enabled:
        t0 = time.time()
        metrics.update(
            nll_bpd(
                loaded,
                dm.test_dataloader(),
                cfg.nll.num_images,
                device,
                seed=int(cfg.seed),
                progress=bool(cfg.progress),
            )
        )
        metrics["test/nll_seconds"] = time.time() - t0
    if cfg.fid.enabled and len(loaded.sample_shape) == 3:
        from ddpm.tasks.fid_eval import fid_is_metrics

        metrics.update(fid_is_metrics(loaded, dm, cfg, device))
    out = output_dir(cfg)
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(Path(out) / "metrics.json")
    return metrics
