"""FID and Inception Score while training (torchmetrics, torch-fidelity's Inception-v3 weights).

Every ``every_n_steps`` optimizer steps all ranks generate together: rank r draws the samples with
indices r, r + W, r + 2W, ... < ``num_samples`` (sample i from seed ``seed + i``, so the sample set
does not depend on the number of devices), computes their features locally, and the torchmetrics
states are summed across ranks (``dist_sync``) when the metric is computed. ``val/fid`` (and
``val/is``, ``val/is_std`` with the Inception network) are logged, so a ``ModelCheckpoint`` can
monitor ``val/fid``.

Reference statistics come once from the un-augmented training split
(``datamodule.reference_dataloader("train")``), at the model's resolution, computed shard-wise on
all ranks and cached under ``cache_dir`` keyed by dataset id, split, resolution, number of images
and feature extractor (:mod:`ddpm.metrics.reference`). They are loaded into the FID metric's real
feature sums on rank 0 only (zeros elsewhere), so the cross-rank sum is exactly the reference.

Without the Inception weights (offline, no local copy) the callback warns once, saying how to
fix it, and disables itself; training goes on. ``feature_extractor`` swaps the network (any
module mapping uint8 (N, 3, H, W) images to (N, D) features, or to (features, logits));
:class:`~ddpm.metrics.RandomConvFeatures` is a tiny offline one for tests. The Inception Score
needs class logits: with an extractor that returns only features, IS is skipped and only FID is
logged.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ddpm.callbacks._common import (
    PeriodicCallback,
    StepCadence,
    check_positive_int,
    denormalizer,
    is_fast_dev_run,
    log_metrics_now,
    sample_shape_of,
)
from ddpm.callbacks.sample_grid import default_sampler, model_device
from ddpm.metrics.features import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionUnavailableError,
    InceptionV3Features,
    extractor_id,
    inception_hub_path,
    num_features_of,
    split_output,
)
from ddpm.metrics.reference import (
    PROBE_IMAGES,
    FeatureStats,
    cache_key,
    cache_path,
    content_probe,
    feature_sums,
    load_cached,
    save_cached,
)
from ddpm.utils.images import to_rgb_uint8
from ddpm.utils.progress import progress_iter
from ddpm.utils.seeding import PerSampleGenerator

log = logging.getLogger(__name__)


class FIDUnavailableWarning(UserWarning):
    """FID/IS cannot be computed in this run (the callback disabled itself)."""


class _Features(nn.Module):
    """Identity "feature extractor" for the torchmetrics metrics: features are computed once per
    batch by the real extractor and fed to both FID and IS."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


class FIDCallback(PeriodicCallback):
    """FID (and IS) of ``num_samples`` generated images every ``every_n_steps`` steps.

    Args:
        sampler: ``sampler(model, diffusion, shape, *, generator, device)`` (the Hydra ``sampler``
            node). Default: DDIM, 50 steps.
        every_n_steps: cadence in optimizer steps (None or 0: only ``at_train_end``).
        num_samples: generated images per evaluation (5k-10k to monitor, 50k for papers).
        batch_size: samples per sampler call on each rank.
        seed: sample i uses seed ``seed + i``.
        use_ema: sample with the EMA network when an EMA callback runs.
        cache_dir: where reference statistics are cached (``paths.cache_dir``).
        reference_split: split of the reference images (``train``, as in DDPM).
        num_reference: reference images (None: the whole split).
        reference_batch_size: batch size when computing reference features.
        feature_extractor: a custom extractor (see :mod:`ddpm.metrics.features`); None = the
            standard Inception-v3.
        feature_extractor_weights_path: local Inception weights
            (``weights-inception-2015-12-05-6726825d.pth``) for offline clusters.
        antialias: resize to 299 with torchmetrics' antialiasing instead of torch-fidelity's
            TF1-style resize (the reference protocol).
        compute_is: also log the Inception Score (needs an extractor that returns logits).
        is_splits: splits of the Inception Score.
        at_train_end: also evaluate when training ends (if not just done at that step).
        download_timeout: socket timeout (s) of the weights download attempt.
        sample_shape: shape of one image; default ``datamodule.sample_shape``.
        progress: progress bar on rank 0 while generating.
    """

    def __init__(
        self,
        sampler: Callable[..., Any] | None = None,
        every_n_steps: int | None = 10_000,
        num_samples: int = 10_000,
        batch_size: int = 250,
        seed: int = 0,
        use_ema: bool = True,
        cache_dir: str = ".cache/ddpm",
        reference_split: str = "train",
        num_reference: int | None = None,
        reference_batch_size: int = 250,
        feature_extractor: nn.Module | None = None,
        feature_extractor_weights_path: str | None = None,
        antialias: bool = False,
        compute_is: bool = True,
        is_splits: int = 10,
        at_train_end: bool = False,
        download_timeout: float = 10.0,
        sample_shape: Sequence[int] | None = None,
        progress: bool = False,
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps or 1)
        check_positive_int("num_samples", num_samples)
        if num_samples < 2:
            raise ValueError(
                f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}"
            )
        check_positive_int("batch_size", batch_size)
        check_positive_int("num_reference", num_reference, allow_none=True)
        check_positive_int("reference_batch_size", reference_batch_size)
        check_positive_int("is_splits", is_splits)
        if feature_extractor is not None and not isinstance(feature_extractor, nn.Module):
            raise ValueError(
                "feature_extractor must be an nn.Module or null, got "
                f"{type(feature_extractor).__name__}"
            )
        self.sampler = sampler
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.use_ema = bool(use_ema)
        self.cache_dir = str(cache_dir)
        self.reference_split = reference_split
        self.num_reference = num_reference
        self.reference_batch_size = int(reference_batch_size)
        self.feature_extractor = feature_extractor
        self.feature_extractor_weights_path = feature_extractor_weights_path
        self.antialias = bool(antialias)
        self.compute_is = bool(compute_is)
        self.is_splits = int(is_splits)
        self.at_train_end = bool(at_train_end)
        self.download_timeout = float(download_timeout)
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.progress = bool(progress)

        self.disabled = False
        self.disabled_reason: str | None = None
        self.extractor: nn.Module | None = None
        self.fid: Any = None
        self.inception_score: Any = None
        self.reference: FeatureStats | None = None
        self.reference_source: str | None = None  # "cache" or "computed"
        self.reference_path: Path | None = None
        self.reference_computations = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self._cadence = StepCadence(self.every_n_steps)
        self._seen_shape: tuple[int, ...] | None = None
        self._warned = False

    # ------------------------------------------------------------------ state
    def _disable(self, reason: str) -> None:
        self.disabled = True
        self.disabled_reason = reason
        if not self._warned:
            self._warned = True
            rank_zero_warn(reason, category=FIDUnavailableWarning)

    def _load_inception(self) -> str | None:
        """Build the Inception extractor; the error message if it cannot be had."""
        try:
            self.extractor = InceptionV3Features(
                self.feature_extractor_weights_path,
                antialias=self.antialias,
                timeout=self.download_timeout,
            )
        except InceptionUnavailableError as e:
            return str(e)
        return None

    def _unavailable_message(self, error: str) -> str:
        if self.feature_extractor_weights_path:
            what = (
                f"cannot load the Inception-v3 weights for FID/IS from "
                f"feature_extractor_weights_path={self.feature_extractor_weights_path}"
            )
        else:
            what = f"cannot download the Inception-v3 weights for FID/IS from {INCEPTION_URL}"
        return (
            f"FIDCallback disabled: {what} ({error}). Training continues without val/fid and "
            f"val/is. To fix it, download {INCEPTION_URL} on a machine with network and either "
            f"put the file at {inception_hub_path()} (the torch hub cache) or set "
            f"callbacks.fid.feature_extractor_weights_path=/path/to/{INCEPTION_FILENAME}."
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.disabled or self.extractor is not None:
            return
        if is_fast_dev_run(trainer):
            return
        if self.feature_extractor is not None:
            self.extractor = self.feature_extractor
            return
        # Rank 0 first (it may download into the shared hub cache), then the others, unless rank
        # 0 already failed: every rank takes the same decision.
        error = self._load_inception() if trainer.is_global_zero else None
        ok0 = trainer.strategy.broadcast(error is None, src=0)
        if not ok0:
            self.extractor = None
            self._disable(self._unavailable_message(error or "failed on rank 0"))
            return
        if not trainer.is_global_zero:
            error = self._load_inception()
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            self.extractor = None
            self._disable(self._unavailable_message(error or "failed on another rank"))

    # ------------------------------------------------------------------ hooks
    # ------------------------------------------------------------------ work
    def _shape(self, trainer: pl.Trainer) -> tuple[int, ...]:
        return sample_shape_of(trainer, self.sample_shape, self._seen_shape)

    def _build_metrics(self, shape: tuple[int, ...], device: torch.device) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore

        assert self.extractor is not None
        self.extractor.to(device).eval()
        dummy = torch.zeros(2, 3, *shape[1:], dtype=torch.uint8, device=device)
        d = num_features_of(self.extractor, dummy)
        self.fid = FrechetInceptionDistance(feature=_Features(d), reset_real_features=False)
        self.fid.to(device)
        logits = getattr(self.extractor, "provides_logits", None)
        if logits is None:
            with torch.no_grad():
                logits = split_output(self.extractor(dummy))[1] is not None
        if self.compute_is and logits:
            with warnings.catch_warnings():  # "will save all extracted features": intended
                warnings.simplefilter("ignore")
                self.inception_score = InceptionScore(feature=_Features(0), splits=self.is_splits)
            self.inception_score.to(device)

    def _reference_loader(self, dm: Any, rank: int = 0, world_size: int = 1) -> Any:
        return dm.reference_dataloader(
            self.reference_split,
            batch_size=self.reference_batch_size,
            max_samples=self.num_reference,
            rank=rank,
            world_size=world_size,
        )

    def _dataset_key(self, dm: Any) -> str:
        key_for = getattr(dm, "data_key_for", None)
        if callable(key_for):
            return str(key_for(self.reference_split))
        return str(dm.dataset_id)

    def _ensure_reference(
        self, trainer: pl.Trainer, shape: tuple[int, ...], device: torch.device
    ) -> None:
        """Load (rank 0) or compute (all ranks, sharded) the reference statistics. Collective."""
        if self.reference_source is not None:  # done (rank 0 holds the statistics)
            return
        dm = trainer.datamodule
        denorm = denormalizer(trainer)
        assert self.extractor is not None
        eid = extractor_id(self.extractor)
        n_ref = len(self._reference_loader(dm).dataset)
        key = cache_key(self._dataset_key(dm), self.reference_split, shape, n_ref, eid)
        path = cache_path(self.cache_dir, key)
        stats = None
        probe = None
        if trainer.is_global_zero:
            first = []
            for batch in self._reference_loader(dm):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                first.append(to_rgb_uint8(x, denorm))
                if sum(f.shape[0] for f in first) >= PROBE_IMAGES:
                    break
            probe = content_probe(torch.cat(first)[:PROBE_IMAGES])
            stats = load_cached(path, key, probe)
        hit = trainer.strategy.broadcast(stats is not None, src=0)
        if not hit:
            loader = self._reference_loader(dm, trainer.global_rank, trainer.world_size)
            total, outer, n = feature_sums(
                self.extractor, loader, denorm, device, self.fid.real_features_sum.shape[0]
            )
            n_t = torch.tensor(n, dtype=torch.float64, device=device)
            total = trainer.strategy.reduce(total, reduce_op="sum")
            outer = trainer.strategy.reduce(outer, reduce_op="sum")
            n = int(round(float(trainer.strategy.reduce(n_t, reduce_op="sum"))))
            stats = FeatureStats.from_sums(total, outer, n)
            self.reference_computations += 1
            self.reference_source = "computed"
            if trainer.is_global_zero:
                save_cached(path, key, probe, stats)
                log.info("FID reference statistics (%d images) saved to %s", n, path)
        else:
            self.reference_source = "cache"
            log.info("FID reference statistics loaded from %s", path)
        self.reference_path = path
        if trainer.is_global_zero:
            assert stats is not None
            self.reference = stats
            total, outer, n = stats.sums()
            self.fid.real_features_sum = total.to(device)
            self.fid.real_features_cov_sum = outer.to(device)
            self.fid.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)

    def _check_usable(self, trainer: pl.Trainer, shape: tuple[int, ...]) -> bool:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not callable(getattr(dm, "reference_dataloader", None)):
            self._disable(
                "FIDCallback disabled: the datamodule has no reference_dataloader() "
                "(un-augmented training images for the reference statistics)"
            )
            return False
        if len(shape) != 3 or shape[0] not in (1, 3):
            self._disable(
                f"FIDCallback disabled: FID needs images (1 or 3 channels), the data "
                f"has sample shape {shape}"
            )
            return False
        if self.num_samples < trainer.world_size:
            self._disable(
                f"FIDCallback disabled: num_samples={self.num_samples} is smaller than "
                f"the {trainer.world_size} devices"
            )
            return False
        return True

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return self.evaluate(trainer, pl_module)

    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float] | None:
        """Generate, compute FID (and IS) and log them. Collective: call on every rank."""
        if self.disabled or is_fast_dev_run(trainer):
            return None
        if self.extractor is None:  # setup did not run for fit (e.g. called directly)
            self.setup(trainer, pl_module, "fit")
            if self.disabled or self.extractor is None:
                return None
        shape = self._shape(trainer)
        if not self._check_usable(trainer, shape):
            return None
        model = pl_module.denoiser(use_ema=self.use_ema)
        device = model_device(model, pl_module.device)
        if self.fid is None:
            self._build_metrics(shape, device)
        self.extractor.to(device).eval()
        self.fid.to(device)
        self._ensure_reference(trainer, shape, device)

        sampler = self.sampler if self.sampler is not None else default_sampler()
        denorm = denormalizer(trainer)
        self.fid.reset()
        if self.inception_score is not None:
            self.inception_score.to(device)
            self.inception_score.reset()
        rank, world = trainer.global_rank, trainer.world_size
        indices = list(range(rank, self.num_samples, world))
        chunks = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        was_training = model.training
        model.eval()
        try:
            for chunk in progress_iter(
                chunks,
                total=len(chunks),
                desc="FID samples",
                enabled=self.progress and trainer.is_global_zero,
            ):
                seeds = [self.seed + i for i in chunk]
                gen = PerSampleGenerator(seeds, device=device)
                x = sampler(
                    model, pl_module.diffusion, (len(chunk), *shape), generator=gen, device=device
                )
                with torch.no_grad():
                    feats, logits = split_output(self.extractor(to_rgb_uint8(x, denorm)))
                    self.fid.update(feats.float(), real=False)
                    if self.inception_score is not None and logits is not None:
                        self.inception_score.update(logits.float())
        finally:
            model.train(was_training)
        metrics = {"val/fid": float(self.fid.compute())}
        if self.inception_score is not None:
            with torch.random.fork_rng(devices=[]):  # IS shuffles with the global RNG
                torch.manual_seed(self.seed)
                is_mean, is_std = self.inception_score.compute()
            metrics["val/is"] = float(is_mean)
            metrics["val/is_std"] = float(is_std)
        log_metrics_now(trainer, metrics)
        self.history.append((trainer.global_step, metrics))
        if trainer.is_global_zero:
            log.info(
                "step %d: %s",
                trainer.global_step,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
            )
        return metrics
