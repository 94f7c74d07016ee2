"""The explicit contracts (ddpm.contracts, PeriodicCallback's constructor): the repo's own
objects meet them, and a user's object that lacks a piece is told which one."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm.callbacks.ema import EMA
from ddpm.callbacks.inputs import sample_shape_of
from ddpm.callbacks.periodic import PeriodicCallback
from ddpm.contracts import (
    Denormalizes,
    HasReferenceImages,
    HasReferenceLoader,
    HasValidationData,
    HoldsEMA,
    KnowsSampleShape,
    find_ema,
    require,
)
from ddpm.data import ImageDataModule, ToyDataModule
from ddpm.tasks.visualize import held_out
from fit_utils import fit, make_module

DATA_PROTOCOLS = (
    KnowsSampleShape,
    Denormalizes,
    HasReferenceImages,
    HasReferenceLoader,
    HasValidationData,
)


class PlainData(pl.LightningDataModule):
    """A user's datamodule with only the Lightning loaders: no shape, denormalize or references."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(16, 1, 8, 8)), batch_size=4)


@pytest.mark.parametrize(
    "dm",
    [
        ImageDataModule("digits", batch_size=8, num_workers=0),
        ToyDataModule("two_moons", n_train=16, n_val=8, batch_size=8),
    ],
    ids=["images", "points"],
)
def test_repo_datamodules_meet_every_data_contract(dm: pl.LightningDataModule) -> None:
    for protocol in DATA_PROTOCOLS:
        assert require(dm, protocol, "test") is dm


def test_missing_pieces_are_named() -> None:
    dm = PlainData()
    assert not isinstance(dm, KnowsSampleShape) and not isinstance(dm, Denormalizes)
    with pytest.raises(TypeError, match=r"needs a datamodule with a `sample_shape` property"):
        require(dm, KnowsSampleShape, "SampleGrid")
    with pytest.raises(TypeError, match=r"reference_dataloader.*HasReferenceLoader.*PlainData"):
        held_out(dm, "val", 4)
    with pytest.raises(TypeError, match=r"got None"):
        require(None, Denormalizes, "x")
    # without the datamodule's shape nor a batch seen, the sample shape cannot be guessed
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    trainer.strategy.connect(make_module())
    with pytest.raises(ValueError, match="KnowsSampleShape"):
        sample_shape_of(trainer, None, None)
    assert sample_shape_of(trainer, None, (1, 8, 8)) == (1, 8, 8)


class Counter(PeriodicCallback):
    def __init__(self, every_n_steps: int | None, at_train_end: bool) -> None:
        super().__init__(every_n_steps, at_train_end)
        self.steps: list[int] = []

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps.append(trainer.global_step)


class Forgetful(PeriodicCallback):
    def __init__(self) -> None:  # no super().__init__: the cadence is never set
        self.steps: list[int] = []


def test_periodic_callback_base_constructor() -> None:
    counter = Counter(every_n_steps=2, at_train_end=True)
    fit(make_module(seed=0), PlainData(), [counter], steps=5)
    assert counter.steps == [2, 4, 5]
    assert counter._seen_shape == (1, 8, 8)  # recorded from the first batch
    with pytest.raises(ValueError, match="every_n_steps"):
        Counter(every_n_steps=-1, at_train_end=False)
    with pytest.raises(TypeError, match=r"Forgetful.__init__ must call super\(\).__init__"):
        fit(make_module(seed=0), PlainData(), [Forgetful()], steps=1)


def test_find_ema_uses_the_ema_contract() -> None:
    ema = EMA(decay=0.9)
    assert isinstance(ema, HoldsEMA) and ema.ema_net is None
    trainer = fit(make_module(seed=0), PlainData(), [ema], steps=2)
    assert find_ema(trainer) is ema and ema.ema_net is not None
