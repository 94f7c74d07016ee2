"""The repo's digit classifier, one home for the benchmark scripts that score digit samples.

An RBF SVC (scikit-learn's digits example: gamma=0.001 on 8x8 average-pooled images in 0..16
units) trained on the training split of the default ``digits`` data (1617 images, the
datamodule's own seeded split); the 180 held-out digits are the reference. Scores of a set of
images in [0, 1], (N, 1, 16, 16):

* ``confidence``: mean top-class probability; ``classes``: distinct predicted classes;
  ``digits_IS``: exp(E KL(p(y|x) || p(y))), an Inception-Score analogue (10 = confident and
  all classes equally often).
* ``frechet``: the Fréchet distance (FID's formula, torchmetrics) between Gaussians fitted to
  the classifier's features of the images and of the held-out digits. The features are the 45
  one-vs-one decision values of the SVC, its representation before the vote.
* ``floor(n)`` (issue 22's measure, ``quality.py``): the data's own figure, the Fréchet distance
  of ``n`` real training digits to the held-out digits. Samples are scored by ``frechet`` with the
  same ``n``, so both estimates carry the same small-sample bias and their ratio is fair: 1 = the
  samples are as close to unseen digits as real digits are (the issue's "2.3x" on main 7160787 is
  this ratio, ``sample_quality.py``'s reference row).

    from digits_classifier import DigitsClassifier
    clf = DigitsClassifier.fit()
    clf.scores(images01)  # {"confidence": .., "digits_IS": .., "classes": .., "frechet": ..}
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ddpm.data import ImageDataModule  # noqa: E402


def to_features(images01: Tensor) -> np.ndarray:
    """(N, 1, 16, 16) in [0, 1] -> (N, 64) in sklearn digits units (8x8, 0..16)."""
    return (F.avg_pool2d(images01.float(), 2).flatten(1) * 16.0).numpy()


def digit_labels(dm: ImageDataModule, split: str) -> np.ndarray:
    """Digit labels of the datamodule's split (same seeded split of sklearn's digits)."""
    from sklearn.datasets import load_digits

    from ddpm.data.datamodule import split_indices
    from ddpm.data.sources import load_digits_uint8
    from ddpm.data.transforms import prepare

    target = load_digits().target
    train_idx, val_idx = split_indices(len(target), dm.val_split, dm.seed)
    idx = val_idx if split == "val" else train_idx
    images = prepare(load_digits_uint8(), dm.image_size, dm.channels)[idx]
    assert torch.equal(images, dm.dataset(split).data), "split differs from ImageDataModule's"
    return target[idx.numpy()]


class _Identity(nn.Module):
    """torchmetrics' FID "feature extractor" for features computed outside it."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _frechet(feats: np.ndarray, reference: np.ndarray) -> float:
    """FID's formula (torchmetrics) between Gaussians fitted to two feature sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Identity(feats.shape[1]))
    fid.update(torch.from_numpy(reference), real=True)
    fid.update(torch.from_numpy(feats), real=False)
    return float(fid.compute())


class DigitsClassifier:
    """The SVC and the held-out digits' features (module docstring)."""

    def __init__(self, svc, held_out01: Tensor, held_out_labels: np.ndarray) -> None:
        self.svc = svc
        self.held_out01 = held_out01
        self.accuracy = float((svc.predict(to_features(held_out01)) == held_out_labels).mean())
        self.reference = self.features(held_out01)

    @classmethod
    def fit(cls) -> DigitsClassifier:
        from sklearn.svm import SVC

        dm = ImageDataModule("digits", root=None)
        train01 = dm.dataset("train").data / 255.0  # (1617, 1, 16, 16)
        svc = SVC(gamma=0.001, probability=True, random_state=0, decision_function_shape="ovo")
        svc.fit(to_features(train01), digit_labels(dm, "train"))
        return cls(svc, dm.dataset("val").data / 255.0, digit_labels(dm, "val"))

    def proba(self, images01: Tensor) -> np.ndarray:
        return self.svc.predict_proba(to_features(images01))

    def features(self, images01: Tensor) -> np.ndarray:
        """(N, 45) one-vs-one decision values."""
        return self.svc.decision_function(to_features(images01))

    def frechet(self, images01: Tensor) -> float:
        """Fréchet distance to the held-out digits in the classifier's feature space."""
        return _frechet(self.features(images01), self.reference)

    def floor(self, n: int) -> float:
        """The data's own figure: ``frechet`` of the first ``n`` real training digits (of 1617)."""
        train01 = ImageDataModule("digits", root=None).dataset("train").data / 255.0
        if not 0 < n <= len(train01):
            raise ValueError(f"n must be in 1..{len(train01)} (training digits), got {n}")
        return self.frechet(train01[:n])

    def scores(self, images01: Tensor, frechet: bool = False) -> dict[str, float]:
        p = self.proba(images01)
        py = p.mean(0, keepdims=True)
        kl = (p * (np.log(p + 1e-12) - np.log(py + 1e-12))).sum(1)
        out = {
            "confidence": round(float(p.max(1).mean()), 3),
            "digits_IS": round(float(np.exp(kl.mean())), 2),
            "classes": int(len(set(p.argmax(1).tolist()))),
        }
        if frechet:
            out["frechet"] = round(self.frechet(images01), 2)
        return out
