"""Negative log-likelihood bound in bits/dim on a fixed validation subset while training.

Every ``every_n_steps`` optimizer steps: the exact variational bound (DDPM eq. 5, all T terms,
:func:`ddpm.diffusion.calc_bpd_loop`) of the first ``num_images`` validation images under the EMA
network. Logged: ``val/nll_bpd`` (total), ``val/nll_prior_bpd`` (L_T), ``val/nll_decoder_bpd``
(L_0, ``vb[:, 0]``) and ``val/nll_vb_bpd`` (Σ_{t>1} L_{t-1}, ``vb[:, 1:]``), so that
total = prior + decoder + vb. The probability-flow ODE likelihood (``ode``;
:func:`ddpm.diffusion.process_nll`, dequantised bits/dim) as ``val/nll_ode_bpd``: by default only
on a process without a bound (EDM, flow matching), with ``ode=true`` also beside DDPM's.

The subset is split into chunks of ``batch_size`` images; chunk k uses noise from a generator
seeded with ``seed + k`` and is evaluated by rank k mod W, and per-image sums are reduced over the
ranks, so the value does not depend on the number of devices. There is no timestep stride: the
bound needs every term, so keep ``num_images`` small instead (it costs T network calls per chunk).
The bound assumes 8-bit images scaled to [-1, 1] (``normalization=minus_one_one``). A
class-conditional network is given each image's label: the bound on -log p(x | y), as
improved-diffusion's ``image_nll.py`` with ``class_cond``.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ddpm.callbacks.inputs import first_labelled_samples
from ddpm.callbacks.periodic import PeriodicCallback, eval_net, is_fast_dev_run, log_metrics_now
from ddpm.contracts import HasValidationData, optional
from ddpm.diffusion.nll import nll_sums
from ddpm.utils.checks import check_positive_int
from ddpm.utils.classes import num_classes_of, with_labels
from ddpm.utils.devices import model_device

log = logging.getLogger(__name__)

METRICS = ("val/nll_bpd", "val/nll_prior_bpd", "val/nll_decoder_bpd", "val/nll_vb_bpd")
ODE_METRIC = "val/nll_ode_bpd"


class NLLCallback(PeriodicCallback):
    """Bits/dim of a fixed validation subset every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: cadence in optimizer steps (None or 0: only ``at_train_end``).
        num_images: the first N images of ``datamodule.val_dataloader()``.
        batch_size: images per ``calc_bpd_loop`` call (also the unit of work per rank).
        seed: chunk k draws its noise from a CPU ``torch.Generator`` seeded ``seed + k``.
        use_ema: evaluate the EMA network when an EMA callback runs.
        clip_denoised: clip x̂₀ to [-1, 1] in the posterior mean (as improved-diffusion's eval).
        at_train_end: also evaluate when training ends (if not just done at that step).
        progress: progress bar over the T terms on rank 0.
        ode: the PF-ODE likelihood too (None: only where the process has no bound).
        ode_rtol: relative and absolute tolerance of its adaptive solver.
    """

    def __init__(
        self,
        every_n_steps: int | None = 5000,
        num_images: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        use_ema: bool = True,
        clip_denoised: bool = True,
        at_train_end: bool = False,
        progress: bool = False,
        ode: bool | None = None,
        ode_rtol: float = 1e-5,
    ) -> None:
        super().__init__(every_n_steps, at_train_end)
        check_positive_int("num_images", num_images)
        check_positive_int("batch_size", batch_size)
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.use_ema = bool(use_ema)
        self.clip_denoised = bool(clip_denoised)
        self.progress = bool(progress)
        self.ode = ode if ode is None else bool(ode)
        self.ode_rtol = float(ode_rtol)
        self.disabled = False
        self.history: list[tuple[int, dict[str, float]]] = []
        self._images: Tensor | None = None
        self._labels: Tensor | None = None
        self._warned = False

    def _warn_disable(self, msg: str) -> None:
        self.disabled = True
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"NLLCallback disabled: {msg}")

    # ------------------------------------------------------------------ work
    def _val_images(self, trainer: pl.Trainer) -> Tensor | None:
        """The first ``num_images`` validation images (model space, CPU), loaded once."""
        if self._images is not None:
            return self._images
        dm = getattr(trainer, "datamodule", None)
        if optional(dm, HasValidationData) is not None:
            loader = dm.val_dataloader()
        else:
            # Without a datamodule: the Trainer's own loader (sharded under DDP, so only exact
            # on one device).
            loader = trainer.val_dataloaders
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
        if loader is None:
            self._warn_disable("no validation data (datamodule.val_dataloader())")
            return None
        norm = getattr(dm, "normalization", "minus_one_one") if dm is not None else None
        if norm not in (None, "minus_one_one"):
            rank_zero_warn(
                f"NLLCallback: data normalization is {norm!r}; the bits/dim bound "
                "assumes 8-bit images scaled to [-1, 1] (minus_one_one)"
            )
        images, self._labels = first_labelled_samples(loader, self.num_images)
        if images is None:
            self._warn_disable("the validation loader is empty")
            return None
        if images.ndim != 4:
            self._warn_disable(
                f"bits/dim needs images (B, C, H, W), got data of shape {tuple(images.shape[1:])}"
            )
            return None
        if images.shape[0] < self.num_images:
            rank_zero_warn(
                f"NLLCallback: only {images.shape[0]} validation images "
                f"(num_images={self.num_images})"
            )
        self._images = images
        return images

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Compute and log the bound now. Collective: call on every rank."""
        if self.disabled or is_fast_dev_run(trainer):
            return None
        images = self._val_images(trainer)
        if images is None:
            return None
        rank, world = trainer.global_rank, trainer.world_size
        process = pl_module.diffusion
        bound = process.discrete
        ode = not bound if self.ode is None else self.ode
        with eval_net(pl_module, self.use_ema) as net:
            device = model_device(net, pl_module.device)
            labels = self._labels if num_classes_of(net) is not None else None
            # per-image sums: total, prior, decoder, vb; ode; and the image count
            sums = torch.zeros(6, dtype=torch.float64, device=device)
            for k, start in enumerate(range(0, images.shape[0], self.batch_size)):
                if k % world != rank:
                    continue
                x = images[start : start + self.batch_size].to(device)
                y = None if labels is None else labels[start : start + self.batch_size]
                # CPU noise: the same values on any device type
                sums[:5] += nll_sums(
                    with_labels(net, y, device),
                    process,
                    x,
                    bound=bound,
                    ode={"rtol": self.ode_rtol, "atol": self.ode_rtol} if ode else None,
                    generator=lambda k=k: torch.Generator().manual_seed(self.seed + k),
                    clip_denoised=self.clip_denoised,
                    progress=self.progress and trainer.is_global_zero,
                )[:5]
                sums[5] += float(x.shape[0])
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        n = float(sums[5])
        metrics = dict(zip(METRICS, (sums[:4] / n).tolist())) if bound else {}
        if ode:
            metrics[ODE_METRIC] = float(sums[4] / n)
        log_metrics_now(trainer, metrics)
        self.history.append((trainer.global_step, metrics))
        if trainer.is_global_zero:
            log.info(
                "step %d: %s",
                trainer.global_step,
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            )
        return metrics
