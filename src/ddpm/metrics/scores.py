"""FID, Inception Score, KID and precision/recall of generated images, on many processes.

* FID (Heusel et al. 2017): ‖μ_g - μ_r‖² + tr(Σ_g + Σ_r - 2 (Σ_g Σ_r)^½) of the feature Gaussians.
* IS (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)), mean ± std over ``isc_splits`` splits.
* KID (Bińkowski et al. 2018): unbiased MMD² with the kernel (x·y/D + 1)³, mean ± std over
  ``kid_subsets`` random subsets of ``kid_subset_size``.
* Precision / recall (Kynkäänniemi et al. 2019): the fraction of generated samples inside the real
  manifold (union of balls reaching each real sample's k-th nearest real neighbour), and vice
  versa, k = ``prc_neighborhood`` = 3.

Each process extracts the features of its own block of images and adds them, batch by batch, to
:class:`Scores`: torchmetrics metrics (:mod:`ddpm.metrics.streaming`) hold the state and reduce
it across processes, and the numbers come from torch-fidelity's formulas on it. So they are
torch-fidelity's, equal on one or many processes, and the same in ``evaluate.py`` and in the
training loop (:class:`ddpm.callbacks.fid.FIDCallback`).

Precision/recall use the same features as FID (Inception pool3 by default), as ADM's evaluator
(Dhariwal & Nichol 2021) and the diffusion papers scored with it report them; Kynkäänniemi et al.
used VGG-16 fc2 features (torch-fidelity's own default for ``prc``), so numbers from the two
are not interchangeable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity import FeatureExtractorBase
from torchmetrics import Metric

from ddpm.metrics import streaming
from ddpm.metrics.features import (
    EXTRACTORS,
    WeightsUnavailableError,
    build_extractor,
    extractor_id,
)
from ddpm.metrics.images import ImageSource, content_probe
from ddpm.metrics.reference import cache_key, cache_path, load_cached, save_cached
from ddpm.utils import distributed as D
from ddpm.utils.progress import progress_iter

log = logging.getLogger(__name__)

METRICS = ("fid", "isc", "kid", "prc")


@dataclass
class Features:
    """Feature rows (N, D) float32 on the CPU and, for IS, class logits (N, K)."""

    features: Tensor
    logits: Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        if not parts:
            raise ValueError("no features to concatenate")
        logits = [p.logits for p in parts]
        return Features(
            torch.cat([p.features for p in parts]),
            None if logits[0] is None else torch.cat(logits),  # type: ignore[arg-type]
        )


class SampleMetrics:
    """Scores of generated images against reference images; see the module docstring.

    Args:
        extractor: ``inception`` (the standard), ``dinov2`` (FD-DINOv2, local weights only) or
            ``randomconv`` (tests); see :mod:`ddpm.metrics.features`.
        weights_path: a local weights file for the extractor (offline machines).
        fid, isc, kid, prc: which metrics (``isc`` needs an extractor with logits).
        isc_splits, kid_subsets, kid_subset_size, prc_neighborhood: as torch-fidelity (and the
            papers): 10, 100, 1000, 3.
        batch_size: images per extractor call.
        cache_dir: where reference features are cached (None: not cached).
        rng_seed: seed of IS's shuffling and KID's subsets (torch-fidelity's default 2020).
        download_timeout: socket timeout (s) of torch-fidelity's Inception download attempt.
        dinov2_repo: a local clone of facebookresearch/dinov2 (``extractor=dinov2``).
    """

    def __init__(
        self,
        extractor: str = "inception",
        weights_path: str | None = None,
        fid: bool = True,
        isc: bool = True,
        kid: bool = True,
        prc: bool = True,
        isc_splits: int = 10,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        prc_neighborhood: int = 3,
        batch_size: int = 250,
        cache_dir: str | None = None,
        rng_seed: int = 2020,
        download_timeout: float | None = 10.0,
        dinov2_repo: str | None = None,
    ) -> None:
        if extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {sorted(EXTRACTORS)}, got {extractor!r}")
        for name, v in (
            ("isc_splits", isc_splits),
            ("kid_subsets", kid_subsets),
            ("kid_subset_size", kid_subset_size),
            ("prc_neighborhood", prc_neighborhood),
            ("batch_size", batch_size),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (fid or isc or kid or prc):
            raise ValueError("no metric selected: set at least one of fid, isc, kid, prc to true")
        self.extractor = extractor
        self.spec = EXTRACTORS[extractor]
        self.weights_path = weights_path
        self.fid, self.isc, self.kid, self.prc = bool(fid), bool(isc), bool(kid), bool(prc)
        self.isc_splits, self.kid_subsets = int(isc_splits), int(kid_subsets)
        self.kid_subset_size, self.prc_neighborhood = int(kid_subset_size), int(prc_neighborhood)
        self.batch_size = int(batch_size)
        self.cache_dir = cache_dir
        self.rng_seed = int(rng_seed)
        self.download_timeout = download_timeout
        self.dinov2_repo = dinov2_repo
        self.net: FeatureExtractorBase | None = None
        self.device = torch.device("cpu")
        self.skipped: dict[str, str] = {}
        self.reference_source: str | None = None  # "cache" or "computed"
        self.reference_path: Path | None = None
        self._extractor_id: str | None = None

    @property
    def selected(self) -> list[str]:
        """Names of the selected metrics (as ``skipped`` reports them)."""
        on = {"fid": self.fid, "is": self.isc, "kid": self.kid, "precision/recall": self.prc}
        return [name for name, wanted in on.items() if wanted]

    # ------------------------------------------------------------------ extractor
    @property
    def needs_logits(self) -> bool:
        return self.isc and self.spec.logits is not None

    def load(self, device: torch.device | str = "cpu") -> None:
        """Build the extractor on every rank (rank 0 first: it may download into the shared
        cache). Collective; raises :class:`WeightsUnavailableError` on every rank if any fails."""
        self.device = torch.device(device)
        if self.net is not None:
            self.net.to(self.device)
            return
        rank, _ = D.rank_and_world()
        error: WeightsUnavailableError | None = None
        for turn in (0, 1):  # rank 0 at turn 0, the others at turn 1
            if (rank == 0) == (turn == 0):
                try:
                    self.net = build_extractor(
                        self.extractor,
                        self.weights_path,
                        logits=self.needs_logits,
                        download_timeout=self.download_timeout,
                        dinov2_repo=self.dinov2_repo,
                    ).to(self.device)
                except WeightsUnavailableError as e:
                    error = e
            if not D.all_true(error is None):
                first = D.broadcast_object(None if error is None else (error.problem, error.fix))
                self.net = None
                if error is not None:
                    raise error
                if first is not None:
                    raise WeightsUnavailableError(*first)
                raise WeightsUnavailableError(
                    "the feature extractor could not be loaded on another rank", "See its log"
                )

    @property
    def extractor_id(self) -> str:
        assert self.net is not None, "call load() first"
        if self._extractor_id is None:
            self._extractor_id = extractor_id(self.net)
        return self._extractor_id

    @torch.no_grad()
    def extract(self, images: Tensor) -> Features:
        """Features of uint8 images (B, 1|3, H, W) (grayscale is repeated to RGB). Local."""
        assert self.net is not None, "call load() first"
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected uint8 images (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        feats, logits = [], []
        for x in images.split(self.batch_size):
            x = x.to(self.device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            with torch.autocast(self.device.type, enabled=False):  # the extractor's own dtype
                out = self.net.convert_features_tuple_to_dict(self.net(x.contiguous()))
            feats.append(out[self.spec.features].float().cpu())
            if self.needs_logits:
                logits.append(out[self.spec.logits].float().cpu())
        return Features(torch.cat(feats), torch.cat(logits) if logits else None)

    def extract_all(
        self, batches: Iterable[Tensor], total: int | None = None, progress: bool = False
    ) -> Features:
        parts = [
            self.extract(x)
            for x in progress_iter(
                batches,
                total=total,
                desc="features",
                enabled=progress,
                unit="images",
                size=len,
                lines=True,
            )
        ]
        if not parts:
            d = torch.zeros(0, 0)
            return Features(d, d if self.needs_logits else None)
        return Features.cat(parts)

    def extract_source(self, source: ImageSource, progress: bool = False) -> Features:
        """This rank's block of ``source``, extracted (local; gather with ``.gather()``)."""
        block = D.shard(len(source))
        batches = source.batches(block.start, block.stop, self.batch_size)
        return self.extract_all(batches, total=len(block), progress=progress)

    # ------------------------------------------------------------------ reference
    def reference(self, source: ImageSource, progress: bool = False) -> Features | None:
        """The reference features (no logits): cached, else extracted by all ranks (each its
        block) and cached by rank 0. Collective; the features on rank 0, None elsewhere."""
        rank, _ = D.rank_and_world()
        key = path = None
        if self.cache_dir and source.key:
            key = cache_key(
                source.key, len(source), source.image_shape, self.extractor_id, self.spec.features
            )
            path = cache_path(self.cache_dir, key)
        cached = probe = None
        if rank == 0 and key is not None:
            probe = content_probe(source)
            cached = load_cached(path, key, probe)  # type: ignore[arg-type]
        self.reference_path = path
        if D.broadcast_object(cached is not None):
            self.reference_source = "cache"
            log.info("reference features loaded from %s", path)
            return Features(cached) if rank == 0 else None  # type: ignore[arg-type]
        local = self.extract_source(source, progress=progress)
        feats = D.gather_rows(local.features)
        self.reference_source = "computed"
        if rank != 0:
            return None
        if key is not None:
            save_cached(path, key, probe, feats)  # type: ignore[arg-type]
            log.info("reference features (%d images) saved to %s", len(feats), path)
        return Features(feats)

    # ------------------------------------------------------------------ scores
    def scores(self) -> Scores:
        """An empty :class:`Scores` of the selected metrics, with these options."""
        return Scores(self)

    def score(self, gen: Features, ref: Features | None) -> dict[str, float]:
        """The scores of every rank's generated features ``gen`` against ``ref`` (needed on
        rank 0 only), on every rank. Collective."""
        scores = self.scores()
        scores.add_reference(ref)
        scores.add(gen)
        result = scores.compute()
        self.skipped = dict(scores.skipped)
        return result


class Scores:
    """The selected scores of a :class:`SampleMetrics` as torchmetrics metrics: the reference
    features once (:meth:`add_reference`, on rank 0; kept by :meth:`reset`), then each batch of
    generated features (:meth:`add`), then :meth:`compute` (collective), the dict of scores
    and :attr:`skipped`, what could not be computed and why."""

    def __init__(self, options: SampleMetrics) -> None:
        self.options = options
        self.metrics: dict[str, Metric] = {}
        self.skipped: dict[str, str] = {}
        self.reference: Features | None = None

    def _start(self, gen: Features) -> None:
        """Build the metrics for the rows' width (and the logits' classes), then add the
        reference: the other ranks add none (empty rows, so that every rank gathers)."""
        o, d = self.options, gen.features.shape[1]
        if o.isc and gen.logits is not None:
            self.metrics["isc"] = streaming.inception_score(
                gen.logits.shape[1], splits=o.isc_splits, rng_seed=o.rng_seed
            )
        if o.fid:
            self.metrics["fid"] = streaming.frechet(d)
        if o.kid or o.prc:
            self.metrics["kid"] = streaming.kernel(
                d,
                subsets=o.kid_subsets,
                subset_size=o.kid_subset_size,
                kid=o.kid,
                prc_neighborhood=o.prc_neighborhood if o.prc else None,
                rng_seed=o.rng_seed,
            )
        for metric in self.metrics.values():
            metric.to(o.device)
        ref = self.reference
        rows = ref.features if ref is not None else torch.zeros(0, d)
        if "fid" in self.metrics and ref is not None:
            self.metrics["fid"].update(rows.to(o.device), real=True)
        if "kid" in self.metrics:
            self.metrics["kid"].update(rows.to(o.device), real=True)

    def add_reference(self, ref: Features | None) -> None:
        """The reference features (on rank 0; None elsewhere)."""
        if self.metrics:
            raise RuntimeError("add the reference before the first generated features")
        self.reference = ref

    def add(self, gen: Features) -> None:
        """A batch of this rank's generated features."""
        if not self.metrics:
            self._start(gen)
        device = self.options.device
        for name, metric in self.metrics.items():
            if name == "isc":
                metric.update(gen.logits.to(device))  # type: ignore[union-attr]
            else:
                metric.update(gen.features.to(device), real=False)

    def compute(self) -> dict[str, float]:
        """The scores of everything added on every rank (collective); the generated features
        are then dropped, the reference kept."""
        o = self.options
        self.skipped = {}
        if o.isc and "isc" not in self.metrics:
            self.skipped["is"] = (
                f"the Inception Score needs class logits and extractor={o.extractor} has none "
                "(use extractor=inception)"
            )
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            out.update({"fid": float(value)} if name == "fid" else value)
            self.skipped.update(getattr(metric, "skipped", {}))
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
