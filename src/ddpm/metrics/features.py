"""Feature extractors for FID / IS: the standard Inception-v3 (torch-fidelity's weights) and a
small deterministic random-conv extractor for tests and offline debugging.

Interface: ``extractor(images) -> features (N, D)`` or ``(features (N, D), logits (N, K))``, where
``images`` are uint8 (N, 3, H, W) in [0, 255] at the data resolution. Extractors carry
``num_features`` (D), ``extractor_id`` (a string naming the network and its weights; it keys the
cached reference statistics) and ``provides_logits`` (class logits for the Inception Score).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator

import torch
from torch import Tensor, nn

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"


class InceptionUnavailableError(RuntimeError):
    """The Inception-v3 weights could not be loaded (no network, wrong path, corrupt file)."""


def inception_hub_path() -> str:
    """Where torch hub (and so torch-fidelity) looks for the downloaded weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILENAME)


@contextlib.contextmanager
def socket_timeout(seconds: float | None) -> Iterator[None]:
    """Temporarily set the default socket timeout (so a download attempt cannot hang)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


class InceptionV3Features(nn.Module):
    """The FID Inception-v3 (TF 2015-12-05 weights, as torch-fidelity / pytorch-fid / torchmetrics):
    uint8 (N, 3, H, W) -> (2048-d pool3 features, 1008 ``logits_unbiased``) in one pass.

    Inputs are resized to 299x299 inside, by default with torch-fidelity's TF1-style bilinear
    resize (``antialias=False``), which is the reference protocol. Always in eval mode.

    Args:
        weights_path: a local copy of ``weights-inception-2015-12-05-6726825d.pth``; None
            downloads it (torch hub cache) when online.
        antialias: torchmetrics' antialiased resize instead of torch-fidelity's (changes FID for
            images larger than 299 px).
        timeout: socket timeout in seconds for the download attempt.
    """

    num_features = 2048
    provides_logits = True

    def __init__(
        self, weights_path: str | None = None, antialias: bool = False, timeout: float | None = 10.0
    ) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        if weights_path is not None and not os.path.isfile(weights_path):
            raise InceptionUnavailableError(
                f"feature_extractor_weights_path={weights_path}: no such file"
            )
        try:
            with socket_timeout(timeout):
                self.net = NoTrainInceptionV3(
                    name="inception-v3-compat",
                    features_list=["2048", "logits_unbiased"],
                    feature_extractor_weights_path=weights_path,
                    antialias=antialias,
                )
        except Exception as e:  # URLError, socket.timeout, corrupt/partial file, ...
            raise InceptionUnavailableError(f"{type(e).__name__}: {e}") from e
        self.antialias = bool(antialias)
        self.extractor_id = "inception-v3-compat-2015-12-05" + ("-antialias" if antialias else "")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionV3Features:
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pool, logits = self.net._torch_fidelity_forward(images)
        return pool.reshape(images.shape[0], -1), logits.reshape(images.shape[0], -1)


class RandomConvFeatures(nn.Module):
    """A small fixed random conv net + global average/std pooling: uint8 (N, 3, H, W) -> (N, D).

    FOR TESTS AND OFFLINE DEBUGGING ONLY: its "FID" is a consistent distance between image sets
    (0 for identical sets, larger for different ones) but not comparable with published FIDs.
    Deterministic: weights come from ``seed`` (same on every device and run). No logits (no IS).
    """

    provides_logits = False

    def __init__(self, num_features: int = 64, seed: int = 0, width: int = 16) -> None:
        super().__init__()
        if num_features < 2 or num_features % 2:
            raise ValueError(f"num_features must be an even integer >= 2, got {num_features}")
        g = torch.Generator().manual_seed(int(seed))
        half = num_features // 2
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(width, half, 3, stride=2, padding=1)
        for conv in (self.conv1, self.conv2):
            fan_in = conv.in_channels * 9
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / fan_in**0.5)
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
        self.num_features = int(num_features)
        self.extractor_id = f"randomconv-d{num_features}-w{width}-seed{seed}"
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 127.5 - 1.0
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)


def extractor_id(extractor: nn.Module) -> str:
    """``extractor.extractor_id`` if set, else the class name and a hash of its weights."""
    eid = getattr(extractor, "extractor_id", None)
    if isinstance(eid, str) and eid:
        return eid
    h = hashlib.sha1()
    for name, t in extractor.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"{type(extractor).__name__}-{h.hexdigest()[:12]}"


def num_features_of(extractor: nn.Module, sample: Tensor) -> int:
    """``extractor.num_features``, else the width of its output on ``sample``."""
    n = getattr(extractor, "num_features", None)
    if isinstance(n, Tensor):
        n = int(n.item())
    if isinstance(n, int):
        return n
    with torch.no_grad():
        out = extractor(sample)
    return int((out[0] if isinstance(out, tuple) else out).shape[-1])


def split_output(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
    """(features, logits or None) from an extractor's output."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None
