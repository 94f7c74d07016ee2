"""Tiny networks, modules, the digits data and real Lightning fits shared by the callback tests."""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ddpm.data import ImageDataModule
from ddpm.diffusion import DiffusionLoss, GaussianDiffusion
from ddpm.module import DiffusionModule

T = 50  # timesteps of the tiny process
SIZE = 8  # image side of image_loader()


class TinyEpsNet(nn.Module):
    """conv -> + timestep embedding -> SiLU -> dropout -> conv. A float and an integer buffer
    (the float one scales the output by 1) exercise buffer handling (EMA, checkpoints); dropout > 0
    makes eval mode matter for sampling."""

    def __init__(
        self, channels: int = 1, hidden: int = 8, num_timesteps: int = T, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.emb = nn.Embedding(num_timesteps, hidden)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = F.silu(self.conv1(x) + self.emb(t)[:, :, None, None])
        return self.conv2(self.drop(h)) * self.scale


def make_module(
    net: nn.Module | None = None, *, lr: float = 1e-2, seed: int | None = None
) -> DiffusionModule:
    """A DiffusionModule on a T=50 linear process with L_simple and Adam(lr); ``seed`` seeds the
    default network's initialisation and the training noise."""
    if seed is not None:
        torch.manual_seed(seed)
    return DiffusionModule(
        net=TinyEpsNet() if net is None else net,
        diffusion=GaussianDiffusion(num_timesteps=T),
        loss=DiffusionLoss("simple"),
        optimizer=functools.partial(torch.optim.Adam, lr=lr),
        train_seed=0 if seed is None else seed,
    )


def image_loader(n: int = 32) -> DataLoader:
    """``n`` fixed random 1-channel SIZE x SIZE images in [-1, 1], batches of 8."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1), batch_size=8
    )


def digits(batch_size: int = 32) -> ImageDataModule:
    """scikit-learn's digits (offline) as an ImageDataModule loading in this process."""
    return ImageDataModule(name="digits", batch_size=batch_size, num_workers=0)


def trainer(steps: int, callbacks: list, **kw: Any) -> pl.Trainer:
    """A quiet CPU Trainer for ``steps`` optimizer steps (no logger, checkpoints, validation,
    progress bar or summary unless ``kw`` says otherwise)."""
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    return pl.Trainer(max_steps=steps, callbacks=callbacks, **opts)


def fit(
    module: pl.LightningModule, data: Any, callbacks: list, steps: int = 4, **kw: Any
) -> pl.Trainer:
    """Fit ``module`` on ``data`` (a DataLoader or a LightningDataModule) for ``steps`` steps."""
    t = trainer(steps, callbacks, **kw)
    if isinstance(data, pl.LightningDataModule):
        t.fit(module, datamodule=data)
    else:
        t.fit(module, data)
    return t
