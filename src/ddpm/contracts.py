"""What the callbacks, tasks and the module expect of the objects they are given.

Each expectation is a small runtime-checkable :class:`typing.Protocol`, so a user's own
datamodule or callback can meet it without inheriting from ours, and a missing piece is
reported by name (:func:`require`) instead of surfacing as an ``AttributeError`` deep inside a
callback. ``isinstance`` checks only that the members exist, not their signatures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn

if TYPE_CHECKING:
    import pytorch_lightning as pl


@runtime_checkable
class KnowsSampleShape(Protocol):
    """Data whose samples have one shape: (C, H, W) images or (D,) points."""

    @property
    def sample_shape(self) -> tuple[int, ...]: ...


@runtime_checkable
class Denormalizes(Protocol):
    """Data that maps model space back to [0, 1] for pictures (model space -> [0, 1])."""

    def denormalize(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class HasReferenceImages(Protocol):
    """Data with the un-augmented uint8 images of a split (the reference set of FID)."""

    def dataset(self, split: str) -> Any: ...


@runtime_checkable
class HasReferenceLoader(Protocol):
    """Data with fixed, un-augmented model-space batches of a split."""

    def reference_dataloader(
        self, split: str = "train", batch_size: int | None = None, **kwargs: Any
    ) -> Iterable[Any]: ...


@runtime_checkable
class HasValidationData(Protocol):
    """Data with a validation loader (Lightning's ``val_dataloader``)."""

    def val_dataloader(self) -> Any: ...


@runtime_checkable
class HoldsEMA(Protocol):
    """A callback that keeps an exponential moving average of the network (``ema_net``; None
    until it has weights). :class:`~ddpm.callbacks.ema.EMA` is one."""

    @property
    def ema_net(self) -> nn.Module | None: ...


def find_ema(trainer: pl.Trainer | None) -> HoldsEMA | None:
    """The EMA callback attached to ``trainer`` (a :class:`HoldsEMA` with weights), if any."""
    if trainer is None:
        return None
    for cb in trainer.callbacks:
        if isinstance(cb, HoldsEMA) and cb.ema_net is not None:
            return cb
    return None


P = TypeVar("P")

_NEEDS: dict[type, str] = {
    KnowsSampleShape: "a datamodule with a `sample_shape` property (one sample's shape, e.g. "
    "(3, 32, 32))",
    Denormalizes: "a datamodule with a `denormalize(x)` method (model space -> [0, 1])",
    HasReferenceImages: "a datamodule with a `dataset(split)` method (the un-augmented uint8 "
    "images)",
    HasReferenceLoader: "a datamodule with a `reference_dataloader(split, batch_size, ...)` method",
    HasValidationData: "a datamodule with a `val_dataloader()` method",
    HoldsEMA: "an EMA callback with an `ema_net` attribute",
}


def require(obj: Any, protocol: type[P], needed_by: str) -> P:
    """``obj`` if it meets ``protocol``, else a TypeError that names what ``needed_by`` needs."""
    if obj is None or not isinstance(obj, protocol):
        got = "None" if obj is None else type(obj).__name__
        raise TypeError(
            f"{needed_by} needs {_NEEDS[protocol]} (ddpm.contracts.{protocol.__name__}); got {got}"
        )
    return obj


def optional(obj: Any, protocol: type[P]) -> P | None:
    """``obj`` if it meets ``protocol``, else None (for what the caller can do without)."""
    return obj if obj is not None and isinstance(obj, protocol) else None
