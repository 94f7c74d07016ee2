"""Shared helpers of the benchmark scripts: models under test, timing, peaks, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"


def _cifar10_kwargs(image_size: int, channels: int, dropout: float) -> dict[str, Any]:
    """Our ``cifar10`` preset at other sizes (attention at half the input size, as at 32x32)."""
    return dict(
        image_size=image_size,
        in_channels=channels,
        dropout=dropout,
        attention_resolutions=(image_size // 2,),  # 16 at 32x32, as diffusers' level 1
    )


def ours(image_size: int = 32, channels: int = 3, dropout: float = 0.1) -> nn.Module:
    """Our DDPM CIFAR-10 U-Net (35.7M parameters)."""
    from ddpm.nn import unet_preset

    return unet_preset("cifar10", **_cifar10_kwargs(image_size, channels, dropout))


def diffusers_unet(image_size: int = 32, channels: int = 3, dropout: float = 0.1) -> nn.Module:
    """diffusers' UNet2DModel with google/ddpm-cifar10-32's configuration (35.7M parameters):
    our architecture with DDPM's released settings (TF padding, GroupNorm eps 1e-6, freq_shift 1),
    mapped by ``ddpm.interop.diffusers``; diffusers' own initialisation."""
    from diffusers import UNet2DModel

    from ddpm.interop.diffusers import unet_to_diffusers_config
    from ddpm.nn import PRESETS

    kwargs = {**PRESETS["cifar10"], **_cifar10_kwargs(image_size, channels, dropout)}
    release = dict(norm_eps=1e-6, downsample_padding=0, freq_shift=1)
    return _Unwrap(UNet2DModel(**unet_to_diffusers_config({**kwargs, **release})))


def ddp_unet(image_size: int = 32, channels: int = 3, dropout: float = 0.1) -> nn.Module:
    """denoising-diffusion-pytorch's Unet(dim=64, dim_mults=(1, 2, 4, 8)) (its README model)."""
    from denoising_diffusion_pytorch import Unet

    return Unet(dim=64, dim_mults=(1, 2, 4, 8), channels=channels, dropout=dropout)


class _Unwrap(nn.Module):
    """diffusers returns a dataclass: expose ``forward(x, t) -> Tensor`` like the others."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t).sample


MODELS: dict[str, Callable[..., nn.Module]] = {
    "ours": ours,
    "diffusers": diffusers_unet,
    "denoising_diffusion_pytorch": ddp_unet,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall-clock and process CPU time of a block (CUDA synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Clock:
        sync(self.device)
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, iters: int = 8) -> float:
    """Achieved GFLOP/s of an n x n x n matmul (the machine's practical peak), wall-clock."""
    return matmul_peaks(device, dtype, n, iters)[0]


def matmul_peaks(
    device: torch.device, dtype: torch.dtype, n: int = 1024, iters: int = 8
) -> tuple[float, float]:
    """GFLOP/s of an n x n x n matmul by wall-clock, and per process-CPU-second times the
    thread count (the CPU-time peak: what the matmul achieves while it has the cores)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    with Clock(device) as c:
        for _ in range(iters):
            a @ b
    flops = 2 * n**3 * iters
    return flops / c.wall / 1e9, flops / c.cpu * torch.get_num_threads() / 1e9


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any], out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
