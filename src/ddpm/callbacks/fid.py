"""FID and Inception Score while training, by :class:`ddpm.metrics.SampleMetrics` (the code
``evaluate.py`` runs).

Every ``every_n_steps`` optimizer steps all ranks generate together: rank r draws its contiguous
block of the ``num_samples`` sample indices (sample i from seed ``seed + i``, so the sample set
does not depend on the number of devices) and adds their features, batch by batch, to torchmetrics
metrics (:class:`ddpm.metrics.Scores`), which reduce them across the ranks; every rank gets and
logs the scores, torch-fidelity's numbers as ``evaluate.py`` computes them: ``val/fid``,
``val/is``, ``val/is_std`` (and ``val/kid``, ``val/precision``, ``val/recall`` when enabled in
``metrics``), so a ``ModelCheckpoint`` can monitor ``val/fid``.

Reference features come from the un-augmented ``reference_split`` of the data module
(``datamodule.dataset(split)``: uint8 images at the model's resolution), extracted once by all
ranks and cached under ``metrics.cache_dir`` (:mod:`ddpm.metrics.reference`).

Without the extractor's weights (offline, no local copy) the callback warns once, naming the file,
where to put it and ``callbacks.fid.metrics.weights_path``, and disables itself; training goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ddpm.callbacks.inputs import default_sampler, denormalizer, sample_shape_of
from ddpm.callbacks.periodic import PeriodicCallback, eval_net, is_fast_dev_run, log_metrics_now
from ddpm.contracts import HasReferenceImages, optional
from ddpm.diffusion.samplers.seeded import sample_batches
from ddpm.metrics import DatasetImages, SampleMetrics, Scores, WeightsUnavailableError
from ddpm.utils.checks import check_positive_int
from ddpm.utils.classes import balanced_labels, num_classes_of
from ddpm.utils.devices import model_device
from ddpm.utils.distributed import shard
from ddpm.utils.images import to_rgb_uint8
from ddpm.utils.progress import progress_iter

log = logging.getLogger(__name__)

WEIGHTS_SETTING = "callbacks.fid.metrics.weights_path"


class FIDUnavailableWarning(UserWarning):
    """FID/IS cannot be computed in this run (the callback disabled itself)."""


class FIDCallback(PeriodicCallback):
    """FID (and IS, ...) of ``num_samples`` generated images every ``every_n_steps`` steps.

    Args:
        sampler: ``sampler(net, diffusion, shape, *, generator, device)`` (the Hydra ``sampler``
            node). Default: DDIM, 50 steps.
        every_n_steps: cadence in optimizer steps (None or 0: only ``at_train_end``).
        num_samples: generated images per evaluation (5k-10k to monitor, 50k for papers).
        batch_size: samples per sampler call on each rank.
        seed: sample i uses seed ``seed + i``.
        use_ema: sample with the EMA network when an EMA callback runs.
        metrics: a :class:`~ddpm.metrics.SampleMetrics` or its arguments (extractor, weights,
            which metrics, cache); arguments not given: FID and IS (no KID, precision/recall)
            with Inception, no cache.
        reference_split: split of the reference images (``train``, as in DDPM).
        num_reference: reference images (None: the whole split).
        at_train_end: also evaluate when training ends (if not just done at that step).
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
        metrics: SampleMetrics | Mapping[str, Any] | None = None,
        reference_split: str = "train",
        num_reference: int | None = None,
        at_train_end: bool = False,
        sample_shape: Sequence[int] | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(every_n_steps, at_train_end)
        check_positive_int("num_samples", num_samples)
        if num_samples < 2:
            raise ValueError(
                f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}"
            )
        check_positive_int("batch_size", batch_size)
        check_positive_int("num_reference", num_reference, allow_none=True)
        if metrics is None or isinstance(metrics, Mapping):
            # while training: FID and IS unless asked (KID, precision/recall cost more)
            metrics = SampleMetrics(**{"kid": False, "prc": False, **(metrics or {})})
        elif not isinstance(metrics, SampleMetrics):
            raise ValueError(
                "metrics must be a SampleMetrics, its arguments or null, got "
                f"{type(metrics).__name__}"
            )
        self.sampler = sampler if sampler is not None else default_sampler()
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.use_ema = bool(use_ema)
        self.metrics = metrics
        self.reference_split = reference_split
        self.num_reference = num_reference
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.progress = bool(progress)

        self.disabled = False
        self.disabled_reason: str | None = None
        self.scores: Scores | None = None  # the reference added once, kept between evaluations
        self.reference_computations = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self._reference_done = False
        self._warned = False

    # ------------------------------------------------------------------ state
    def _disable(self, reason: str) -> None:
        self.disabled = True
        self.disabled_reason = reason
        if not self._warned:
            self._warned = True
            rank_zero_warn(reason, category=FIDUnavailableWarning)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.disabled or self.metrics.net is not None:
            return
        if is_fast_dev_run(trainer):
            return
        try:
            self.metrics.load(pl_module.device)
        except WeightsUnavailableError as e:
            self._disable(
                f"FIDCallback disabled, training continues without val/fid and val/is: "
                f"{e.for_setting(WEIGHTS_SETTING)}"
            )

    # ------------------------------------------------------------------ work
    def _check_usable(self, trainer: pl.Trainer, shape: tuple[int, ...]) -> bool:
        if optional(getattr(trainer, "datamodule", None), HasReferenceImages) is None:
            self._disable(
                "FIDCallback disabled: the datamodule has no dataset(split) (the un-augmented "
                "uint8 images of the reference set; ddpm.contracts.HasReferenceImages)"
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

    def _ensure_reference(self, trainer: pl.Trainer) -> None:
        """Cached or computed (sharded over the ranks) reference features. Collective."""
        if self._reference_done:
            return
        dm = trainer.datamodule
        key_for = getattr(dm, "data_key_for", None)
        key = str(key_for(self.reference_split)) if callable(key_for) else ""
        source = DatasetImages(
            dm.dataset(self.reference_split),
            key=key,
            limit=self.num_reference,
            num_workers=int(getattr(dm, "num_workers", 0) or 0),
        )
        self.scores = self.metrics.scores()
        self.scores.add_reference(self.metrics.reference(source))  # rank 0's; None elsewhere
        self.reference_computations += int(self.metrics.reference_source == "computed")
        self._reference_done = True

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Generate, score and log. Collective: call on every rank."""
        if self.disabled or is_fast_dev_run(trainer):
            return None
        if self.metrics.net is None:  # setup did not run for fit (e.g. called directly)
            self.setup(trainer, pl_module, "fit")
            if self.disabled:
                return None
        shape = sample_shape_of(trainer, self.sample_shape, self._seen_shape)
        if not self._check_usable(trainer, shape):
            return None
        block = shard(self.num_samples, trainer.global_rank, trainer.world_size)
        denorm = denormalizer(trainer)
        with eval_net(pl_module, self.use_ema) as net:
            device = model_device(net, pl_module.device)
            self.metrics.load(device)
            self._ensure_reference(trainer)
            assert self.scores is not None
            k = num_classes_of(net)
            # sample i for class i % K: balanced over the classes
            labels = None if k is None else balanced_labels(block, k)
            batches = sample_batches(
                self.sampler,
                net,
                pl_module.diffusion,
                shape,
                [self.seed + i for i in block],
                self.batch_size,
                device,
                labels,
            )
            for x in progress_iter(
                batches,
                total=len(block),
                desc="FID samples",
                enabled=self.progress and trainer.is_global_zero,
                unit="images",
                size=len,
                lines=True,
            ):
                self.scores.add(self.metrics.extract(to_rgb_uint8(x, denorm)))
        scores = self.scores.compute()
        self.scores.reset()  # the generated features; the reference stays
        metrics = {f"val/{k}": v for k, v in scores.items() if k != "kid_subset_size"}
        log_metrics_now(trainer, metrics)
        self.history.append((trainer.global_step, metrics))
        if trainer.is_global_zero:
            log.info(
                "step %d: %s",
                trainer.global_step,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
            )
        return metrics
