"""Feature extractors for FID / IS / KID / precision-recall.

All are torch-fidelity ``FeatureExtractorBase`` subclasses in torch-fidelity's registry
(``torch_fidelity.register_feature_extractor``), so ``torch_fidelity.calculate_metrics`` runs each
of them by name exactly as it runs its own Inception; they map uint8 (N, 3, H, W) images to a
tuple of feature tensors named by ``features_list``.

=============  ==============================================================  ===================
``extractor``  network                                                         layers (FID / IS)
=============  ==============================================================  ===================
``inception``  Inception-v3 with the TF 2015-12-05 weights, torch-fidelity's   ``2048`` (pool3) /
               ``inception-v3-compat`` (the FID protocol: Heusel et al. 2017)  ``logits_unbiased``
``dinov2``     DINOv2 ViT-L/14 for FD-DINOv2 (Stein et al. 2023), with         ``dinov2`` (CLS) /
               EDM2's preprocessing; loaded from local files only              none (no IS)
``randomconv`` a small fixed random conv net: tests and offline debugging,     ``features`` /
               its numbers are not comparable with published ones              ``logits``
=============  ==============================================================  ===================

Weights come from a local file (``weights_path``) or the torch hub cache; only the Inception
weights are ever downloaded (by torch-fidelity, when online). When they cannot be had,
:class:`WeightsUnavailableError` names the file, where to put it and the setting to use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor, nn
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
DINOV2_REPO_URL = "https://github.com/facebookresearch/dinov2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hub_checkpoint(file_name: str) -> Path:
    """Where torch hub (and so torch-fidelity) keeps a downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


class WeightsUnavailableError(RuntimeError):
    """A feature extractor's weights (or code) could not be loaded.

    The message names the missing file, where to get it, where to put it and the setting that
    points at a local copy; :meth:`for_setting` rewrites it for another setting name (the
    in-training callback's key instead of ``evaluate.py``'s)."""

    def __init__(self, problem: str, fix: str = "", setting: str = "metrics.weights_path") -> None:
        self.problem, self.fix, self.setting = problem, fix, setting
        super().__init__(f"{problem}. {fix.format(setting=setting)}" if fix else problem)

    def for_setting(self, setting: str) -> WeightsUnavailableError:
        return WeightsUnavailableError(self.problem, self.fix, setting)


@contextlib.contextmanager
def socket_timeout(seconds: float | None) -> Iterator[None]:
    """Temporarily set the default socket timeout (so a download attempt cannot hang)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _check_uint8_rgb(x: Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")


class UncompiledExtractor(FeatureExtractorBase):
    """A torch-fidelity extractor of ours: torch-fidelity never compiles it, so its dummy
    compile input is never used."""

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


class RandomConvFeatures(UncompiledExtractor):
    """Test-sized deterministic extractor: a fixed random conv net with mean/std pooling
    (``features``, D-dimensional) and ``logits`` for IS, a fixed pseudo-random function of the
    features, 3 sin(30 f·P) (a linear map would give every image nearly the same class, IS ≈ 1).

    FOR TESTS AND OFFLINE DEBUGGING ONLY: its scores are consistent distances between image sets
    (FID 0 for identical sets) but not comparable with published numbers. The weights come from
    ``seed``: the same in every process and run.
    """

    NAME = "ddpm-randomconv"

    def __init__(
        self,
        name: str = NAME,
        features_list: Sequence[str] = ("features", "logits"),
        num_features: int = 64,
        num_classes: int = 10,
        seed: int = 0,
        width: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, list(features_list))
        if num_features < 2 or num_features % 2:
            raise ValueError(f"num_features must be an even integer >= 2, got {num_features}")
        g = torch.Generator().manual_seed(int(seed))
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(width, num_features // 2, 3, stride=2, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / fan_in**0.5)
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
        self.register_buffer("proj", torch.randn(num_features, num_classes, generator=g))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "features"

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        _check_uint8_rgb(x)
        h = x.float() / 127.5 - 1.0
        h = torch.relu(self.conv2(torch.relu(self.conv1(h))))
        f = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)
        out = {"features": f, "logits": 3.0 * torch.sin(30.0 * f @ self.proj)}
        return tuple(out[k] for k in self.features_list)


class DinoV2Features(UncompiledExtractor):
    """DINOv2 ViT-L/14 CLS features for FD-DINOv2 (Stein et al. 2023), preprocessed as EDM2's
    evaluation (Karras et al. 2024): bicubic antialiased resize to 224x224, ImageNet mean/std.

    Loaded from local files only, never downloaded: the facebookresearch/dinov2 code (a clone,
    ``dinov2_repo``; default: where ``torch.hub.load("facebookresearch/dinov2", ...)`` leaves it,
    ``<torch hub dir>/facebookresearch_dinov2_main``) and the weights
    (``feature_extractor_weights_path``; default ``<torch hub dir>/checkpoints/`` +
    ``dinov2_vitl14_pretrain.pth``).
    """

    NAME = "ddpm-dinov2-vit-l-14"
    INPUT_SIZE = 224
    ENTRYPOINT = "dinov2_vitl14"

    def __init__(
        self,
        name: str = NAME,
        features_list: Sequence[str] = ("dinov2",),
        feature_extractor_weights_path: str | None = None,
        dinov2_repo: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, list(features_list))
        repo = Path(dinov2_repo or Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main")
        weights = Path(feature_extractor_weights_path or hub_checkpoint(Path(DINOV2_URL).name))
        if not (repo / "hubconf.py").is_file():
            raise WeightsUnavailableError(
                f"FD-DINOv2 needs the DINOv2 code and it is not at {repo} (no hubconf.py there)",
                f"Clone {DINOV2_REPO_URL} there (or anywhere, and set metrics.dinov2_repo=DIR); "
                "it is loaded with torch.hub.load(DIR, source='local'), nothing is downloaded",
            )
        if not weights.is_file():
            raise WeightsUnavailableError(
                f"FD-DINOv2 needs the DINOv2 ViT-L/14 weights and {weights} does not exist",
                f"Download {DINOV2_URL} on a machine with network and put it at "
                f"{hub_checkpoint(Path(DINOV2_URL).name)} or pass {{setting}}=/path/to/"
                f"{Path(DINOV2_URL).name}",
            )
        self.model = torch.hub.load(str(repo), self.ENTRYPOINT, source="local", pretrained=False)
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("dinov2",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "dinov2"

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        _check_uint8_rgb(x)
        size = (self.INPUT_SIZE, self.INPUT_SIZE)
        x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True) / 255.0
        x = (x - self.mean) / self.std
        return (self.model(x).float(),)


@dataclass(frozen=True)
class ExtractorSpec:
    """An extractor: its torch-fidelity class and registry name, the layer holding the features
    for FID/KID/precision-recall, the layer with class logits for IS (None: no IS)."""

    cls: type[FeatureExtractorBase]
    registry_name: str
    features: str
    logits: str | None


EXTRACTORS: dict[str, ExtractorSpec] = {
    "inception": ExtractorSpec(
        torch_fidelity.FeatureExtractorInceptionV3, "inception-v3-compat", "2048", "logits_unbiased"
    ),
    "dinov2": ExtractorSpec(DinoV2Features, DinoV2Features.NAME, "dinov2", None),
    "randomconv": ExtractorSpec(RandomConvFeatures, RandomConvFeatures.NAME, "features", "logits"),
}


def _register(name: str, cls: type[FeatureExtractorBase]) -> None:
    try:
        torch_fidelity.register_feature_extractor(name, cls)
    except ValueError:  # already registered (module reloaded)
        pass


_register(RandomConvFeatures.NAME, RandomConvFeatures)
_register(DinoV2Features.NAME, DinoV2Features)


def _inception_fix() -> str:
    name = Path(URL_INCEPTION_V3).name
    return (
        f"Download {URL_INCEPTION_V3} on a machine with network and either put it at "
        f"{hub_checkpoint(name)} (torch-fidelity's download location, the torch hub cache "
        f"$TORCH_HOME/hub/checkpoints) or pass {{setting}}=/path/to/{name}"
    )


def _load_inception(
    spec: ExtractorSpec, layers: list[str], weights_path: str | None, timeout: float | None
) -> FeatureExtractorBase:
    cached = hub_checkpoint(Path(URL_INCEPTION_V3).name)
    if weights_path is not None and not os.path.isfile(weights_path):
        raise WeightsUnavailableError(
            f"the Inception-v3 weights file {weights_path} does not exist", _inception_fix()
        )
    path = weights_path or (str(cached) if cached.is_file() else None)
    try:
        with socket_timeout(timeout):  # path None: torch-fidelity downloads into the hub cache
            return spec.cls(
                spec.registry_name, layers, feature_extractor_weights_path=path, verbose=False
            )
    except Exception as e:  # URLError, timeout, truncated or foreign file, ...
        what = f"from {path}" if path else f"(no local copy at {cached}; downloading it failed)"
        raise WeightsUnavailableError(
            f"cannot load the Inception-v3 weights of FID, IS, KID and precision/recall {what}: "
            f"{type(e).__name__}: {e}",
            _inception_fix(),
        ) from e


def build_extractor(
    name: str,
    weights_path: str | None = None,
    *,
    logits: bool = True,
    download_timeout: float | None = 10.0,
    dinov2_repo: str | None = None,
) -> FeatureExtractorBase:
    """The extractor ``name`` (see :data:`EXTRACTORS`) in eval mode, returning its feature layer
    and, if ``logits`` and it has one, its logits layer. Raises :class:`WeightsUnavailableError`.
    """
    if name not in EXTRACTORS:
        raise ValueError(f"metrics.extractor must be one of {sorted(EXTRACTORS)}, got {name!r}")
    spec = EXTRACTORS[name]
    layers = [spec.features] + ([spec.logits] if logits and spec.logits else [])
    if name == "inception":
        net = _load_inception(spec, layers, weights_path, download_timeout)
    elif name == "dinov2":
        net = spec.cls(spec.registry_name, layers, weights_path, dinov2_repo=dinov2_repo)
    else:
        if weights_path is not None:
            raise ValueError("metrics.extractor=randomconv has no weights: unset weights_path")
        net = spec.cls(spec.registry_name, layers)
    net.requires_grad_(False)
    return net.eval()


def extractor_id(net: nn.Module) -> str:
    """The extractor's registry name and a hash of its weights (keys cached reference features)."""
    h = hashlib.sha1()
    for key, t in net.state_dict().items():
        h.update(key.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    name = net.get_name() if isinstance(net, FeatureExtractorBase) else type(net).__name__
    return f"{name}-{h.hexdigest()[:12]}"
