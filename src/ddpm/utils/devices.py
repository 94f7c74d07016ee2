"""Where a network lives, and where a process computes: the one rule from ``accelerator`` /
``devices`` (a Trainer's or a task's) to a ``torch.device``, as Lightning places a process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ddpm.errors import ConfigError
from ddpm.utils.distributed import launch_local_rank

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def model_device(model: Any, default: torch.device | str = "cpu") -> torch.device:
    """Device of ``model``'s first parameter or buffer (``default`` if it has none, or if it is
    a plain function)."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device(default)


def _mps_available() -> bool:
    return torch.backends.mps.is_available()


def device_index(devices: Any = None) -> int:
    """The accelerator index of this process: its local rank (``LOCAL_RANK`` of torchrun and
    Lightning's launcher, ``SLURM_LOCALID`` of srun; 0 for one process), or the local rank's
    entry of an explicit list ``devices=[2,3]`` / ``devices="2,3"`` (as Lightning assigns
    ``parallel_devices[local_rank]``). A count (``devices=2``, ``"auto"``) numbers from 0."""
    rank = launch_local_rank()
    listed: Sequence[Any] | None = None
    if isinstance(devices, str) and "," in devices:
        listed = [d for d in devices.split(",") if d.strip()]
    elif isinstance(devices, Sequence) and not isinstance(devices, str):
        listed = list(devices)
    if listed is None:
        return rank
    if rank >= len(listed):
        raise ConfigError(f"devices={list(listed)} lists no device for local rank {rank}")
    return int(listed[rank])


def run_device(
    accelerator: Any = "auto", devices: Any = None, setting: str = "accelerator"
) -> torch.device:
    """The device this process computes on for ``accelerator`` (auto | cpu | gpu | cuda | mps,
    or a torch device such as ``cuda:1``) and ``devices``, as Lightning's Trainer places it:
    ``cuda:``:func:`device_index` on a GPU (``gpu`` is CUDA, else Apple's MPS), the CPU for
    ``cpu`` or when ``auto`` finds no accelerator. An accelerator that is not there is a
    ConfigError naming ``setting`` (Lightning refuses it too)."""
    acc = "auto" if accelerator is None else str(accelerator)
    cuda, mps = torch.cuda.is_available(), _mps_available()
    if acc == "auto":
        acc = "cuda" if cuda else "mps" if mps else "cpu"
    elif acc == "gpu":
        acc = "cuda" if cuda or not mps else "mps"
    if acc == "cpu":
        return torch.device("cpu")
    if acc == "cuda":
        device = torch.device("cuda", device_index(devices))
    else:
        try:
            device = torch.device(acc)
        except RuntimeError as e:
            raise ConfigError(
                f"{setting} must be {', '.join(ACCELERATORS[:-1])} or {ACCELERATORS[-1]}, or a "
                f"torch device such as cuda:1; got {accelerator!r}"
            ) from e
    if device.type == "mps" and not mps:
        raise ConfigError(f"{setting}={accelerator}, but MPS is not available on this machine")
    if device.type == "cuda" and not cuda:
        raise ConfigError(
            f"{setting}={accelerator} asks for a CUDA GPU, but torch finds none on this machine "
            f"(torch.cuda.is_available() is False): use {setting}=cpu, or auto"
        )
    return device
