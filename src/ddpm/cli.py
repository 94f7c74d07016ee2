"""The command-line apps, one Hydra app per task: ``ddpm-train``, ``ddpm-sample``,
``ddpm-evaluate``, ``ddpm-export``, ``ddpm-visualize``, ``ddpm-reflow`` (console scripts of an installed package),
the same apps as ``python src/train.py`` ... in a checkout. Every argument is a Hydra override;
``--config-dir DIR`` adds a directory of your own configs to the search path.

    ddpm-train                                            # digits on the CPU, a few minutes
    ddpm-train schedule=cosine objective=hybrid           # any config group or Trainer argument
    ddpm-train experiment=cifar10_ddpm trainer.devices=4  # a paper recipe on 4 GPUs
    ddpm-train -m schedule=linear,cosine                  # a Hydra multirun sweep
    ddpm-train run_dir=outputs/train/runs/X ckpt_path=last   # resume run X
    ddpm-sample ckpt_path=PATH sampler=ddim sampler.steps=50 num_samples=1000   # -> samples.npz
    ddpm-evaluate samples=PATH.npz ref=cifar10-train      # FID, IS, KID, precision/recall
    ddpm-evaluate ckpt_path=PATH metrics.enabled=false    # test NLL (bits/dim) only
    ddpm-export ckpt_path=PATH out=model.safetensors      # or format=diffusers out=DIR
    ddpm-visualize what=forward 'schedules=[linear,cosine]'
    ddpm-reflow experiment=swiss_roll teacher=PATH     # rectified flow's reflow of a flow model

The configs are the checkout's ``conf/`` or the installed copy (:func:`ddpm.project.config_path`);
before Hydra makes the run directory, :class:`HardwareCheck` refuses a launch whose accelerator
this machine does not have.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import ddpm.hydra_setup  # noqa: F401 - resolvers and U-Net presets, before Hydra composes
from ddpm.config import devices_count
from ddpm.errors import reports_errors
from ddpm.project import config_path
from ddpm.tasks.evaluate import evaluate as evaluate_task
from ddpm.tasks.export import export as export_task
from ddpm.tasks.reflow import reflow as reflow_task
from ddpm.tasks.sample import sample as sample_task
from ddpm.tasks.train import train as train_task
from ddpm.tasks.visualize import visualize as visualize_task

CONFIG_PATH = config_path()


def missing_hardware(accelerator: Any, devices: Any, prefix: str = "") -> str | None:
    """One line saying what ``<prefix>accelerator`` / ``<prefix>devices`` ask for that this
    machine lacks, naming the override to use instead; None when it is here (or the accelerator
    is ``auto`` / ``cpu``, which always run)."""
    acc = str(accelerator).lower()
    if acc in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if acc == "gpu" and have == 0 and torch.backends.mps.is_available():
            have = 1  # Lightning's "gpu" is Apple's MPS device there
        kind = "GPU"
    elif acc == "mps":
        have, kind = int(torch.backends.mps.is_available()), "MPS device"
    else:
        return None
    want = devices_count(devices, acc) or 1  # auto / -1: every device there is, at least one
    if have >= want:
        return None
    asked = f"{prefix}accelerator={accelerator} {prefix}devices={devices}"
    if have == 0:
        why = "a CPU-only torch build" if acc != "mps" and torch.version.cuda is None else "none"
        return (
            f"{asked} needs {want} {kind}(s), but this machine has {why}: add "
            f"{prefix}accelerator=cpu {prefix}devices=1 to run on the CPU"
        )
    return f"{asked} needs {want} {kind}s, but this machine has {have}: add {prefix}devices={have}"


class HardwareCheck(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): check the accelerator before the run starts.
    Hydra calls ``on_run_start`` / ``on_multirun_start`` after composing and before it makes any
    run directory, so a launch on the wrong machine leaves nothing behind (no run directory, no
    W&B run) and exits with one line. Training reads ``trainer.accelerator`` /
    ``trainer.devices``; the other tasks ``accelerator`` / ``devices``."""

    def _check(self, config: DictConfig) -> None:
        for prefix in ("trainer.", ""):
            accelerator = OmegaConf.select(config, prefix + "accelerator", default=None)
            if accelerator is not None:
                devices = OmegaConf.select(config, prefix + "devices", default=1)
                problem = missing_hardware(accelerator, devices, prefix)
                if problem:
                    raise SystemExit(problem)
                return

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@reports_errors
def train(cfg: DictConfig) -> float | None:
    """``ddpm-train``: train a diffusion model; returns ``optimized_metric`` (for a sweeper)."""
    metrics = train_task(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
@reports_errors
def sample(cfg: DictConfig) -> None:
    """``ddpm-sample``: samples.npz (improved-diffusion's format) and grid.png from a checkpoint;
    ``devices=N`` splits the samples over N processes (the same images as one)."""
    sample_task(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@reports_errors
def evaluate(cfg: DictConfig) -> None:
    """``ddpm-evaluate``: FID, IS, KID, precision/recall of samples and a checkpoint's NLL
    (bits/dim) into metrics.json."""
    evaluate_task(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
@reports_errors
def export(cfg: DictConfig) -> None:
    """``ddpm-export``: a checkpoint as our safetensors or a diffusers pipeline folder; a diffusers
    folder in as our format."""
    export_task(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="visualize")
@reports_errors
def visualize(cfg: DictConfig) -> None:
    """``ddpm-visualize``: pictures of diffusion (PNG files in the run directory)."""
    visualize_task(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="reflow")
@reports_errors
def reflow(cfg: DictConfig) -> float | None:
    """``ddpm-reflow``: rectified flow's reflow of a flow-matching checkpoint (pairs, then a
    training run from the teacher's weights; :mod:`ddpm.tasks.reflow`)."""
    metrics = reflow_task(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None
