"""The LightningModule: a network trained with a diffusion objective on any process of the family
(DDPM's discrete chain, EDM's, rectified flow; :mod:`ddpm.diffusion.process`).

Thin glue: the network comes from ``ddpm.nn``, the process, the loss and the timestep sampler from
``ddpm.diffusion``, the optimizer and LR schedule from config (``_partial_`` callables). Every
random draw comes from a stream seeded by its position (:mod:`ddpm.utils.seeding`): a training
step's timesteps, noise, label dropout and dropout by (seed, rank, epoch, batch), so a resumed run
draws what the uninterrupted one drew without any RNG state in the checkpoint; a validation
batch's timesteps and noise by (val_seed, rank, batch), so ``val/loss`` is comparable across
evaluations; a batch of coupled pairs (:class:`~ddpm.data.pairs.CoupledBatch`, rectified flow's
reflow) brings its own noise. The validation losses are torchmetrics ``MeanMetric``s: the mean over every
validation sample of every rank (the quartiles of t too, weighted by membership).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ddpm.callbacks._lightning import clip_gradients
from ddpm.checkpoint import (
    BUILT_SECTIONS,
    CONFIG_KEY,
    T_SAMPLER_KEY,
    check_stored_config,
    net_state_dict,
    read_checkpoint,
)
from ddpm.contracts import find_ema
from ddpm.data.pairs import CoupledBatch
from ddpm.diffusion import DiffusionLoss, Process, TimestepSampler
from ddpm.diffusion.timestep_sampling import default_timestep_sampler
from ddpm.utils.classes import with_labels
from ddpm.utils.seeding import seed_global_rngs, seeded_generator, step_seed

_GLOBAL_STREAM, _NOISE_STREAM = 0, 1
QUARTILES = 4  # losses by quartile of t: q0 = smallest t (least noise)
VAL_MEANS = ("loss", "loss_ema", *(f"loss_q{i}" for i in range(QUARTILES)))


class DiffusionModule(pl.LightningModule):
    """Wraps ``net`` and the diffusion loss.

    Args:
        net: ``net(x_t, τ, class_labels=None) -> output`` (``ddpm.nn``); output channels must
            match the process's ``model_output_channels``. A class-conditional network (with
            a ``null_class``) trains on ``(x, labels)`` batches.
        diffusion: the process (:class:`~ddpm.diffusion.process.Process`: schedule and
            parameterisation).
        loss: a :class:`DiffusionLoss` (simple / hybrid / vlb).
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``).
        lr_scheduler: ``optimizer -> LRScheduler`` stepped every optimizer step, or None.
        timestep_sampler: draws the t of each training sample and its importance weight; default
            uniform (DDPM), ``LossSecondMomentTimestepSampler`` for improved DDPM's importance
            sampling, EDM's log-normal σ, flow matching's uniform or logit-normal t; it must
            draw in the process's time domain. Told every step's losses (``update``); its
            ``state_dict``, if it has one, is checkpointed.
        val_seed: seed of the validation t and noise (the same at every evaluation).
        train_seed: seed of the training t, noise, label dropout and dropout.
        compile: wrap the network in ``torch.compile`` for training.
        run_config: the resolved run config (plain dict) stored in every checkpoint.
        p_uncond: probability that a training label is replaced by the null class, so one
            network learns ε(x_t, y) and ε(x_t) for classifier-free guidance (Ho & Salimans
            2022, Alg. 1: 0.1-0.2); drawn from the step's seeded noise stream.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: Process,
        loss: DiffusionLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        timestep_sampler: TimestepSampler | None = None,
        val_seed: int = 1234,
        train_seed: int = 0,
        compile: bool = False,
        run_config: dict | None = None,
        p_uncond: float = 0.1,
    ) -> None:
        super().__init__()
        loss.check(diffusion)
        if isinstance(p_uncond, bool) or not 0.0 <= float(p_uncond) <= 1.0:
            raise ValueError(f"p_uncond must be a probability in [0, 1], got {p_uncond!r}")
        self.timestep_sampler = timestep_sampler or default_timestep_sampler(diffusion)
        self.timestep_sampler.check(diffusion)
        self.p_uncond = float(p_uncond)
        self.net = net
        self.diffusion = diffusion
        self.loss = loss
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_seed = int(val_seed)
        self.train_seed = int(train_seed)
        self.run_config = run_config
        self.compile = bool(compile)
        self.validated_step: int | None = None  # global step of the latest validation
        # val/<name>: means over all validation samples, reduced across devices by torchmetrics
        self.val_means = nn.ModuleDict({name: MeanMetric() for name in VAL_MEANS})
        # Kept out of the module registry (no duplicate keys in the state_dict).
        self.__dict__["_train_net"] = torch.compile(net) if compile else net

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], run_config: dict | None = None, **overrides: Any
    ) -> DiffusionModule:
        """The module a run config describes (a composed config, or one stored in a checkpoint):
        network, diffusion, loss and timestep sampler, optimizer and LR schedule; ``overrides``
        replace constructor arguments."""
        cfg = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(dict(cfg))
        lr_scheduler = instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
        kwargs: dict[str, Any] = dict(
            net=instantiate(cfg.model),
            diffusion=instantiate(cfg.diffusion),
            loss=instantiate(cfg.objective.loss),
            # plain lists (betas), not ListConfig: the optimizer state lands in checkpoints,
            # which are opened with torch.load(weights_only=True)
            optimizer=instantiate(cfg.optimizer, _convert_="all"),
            lr_scheduler=lr_scheduler,
            timestep_sampler=instantiate(cfg.objective.timestep_sampler),
            train_seed=int(cfg.seed),
            compile=bool(cfg.get("compile", False)),
            run_config=run_config,
        )
        if cfg.get("p_uncond") is not None:
            kwargs["p_uncond"] = float(cfg.p_uncond)
        return cls(**{**kwargs, **overrides})

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: str | torch.device | None = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> DiffusionModule:
        """Lightning's way to load a module, for this framework's checkpoints (``.ckpt`` files
        and ``export.py``'s ``.safetensors``): opened with ``torch.load(weights_only=True)``
        whatever ``weights_only`` says (they hold tensors and plain data only), the module is
        rebuilt from the run config stored in the file (:meth:`from_config`; it may name only
        our classes and those ``conf/`` names), then the network's trained weights and the
        timestep sampler's state are loaded. The EMA weights are the checkpoint's
        ``ema_state_dict``; :func:`ddpm.checkpoint.load_model` samples with them.
        ``kwargs`` replace constructor arguments (e.g. ``compile=True``)."""
        if hparams_file is not None:
            raise ValueError(
                "hparams_file: a ddpm checkpoint holds its own run config; it is not read"
            )
        path = os.fspath(checkpoint_path)
        ckpt = read_checkpoint(path)
        config = ckpt[CONFIG_KEY]
        check_stored_config(config, path, sections=(*BUILT_SECTIONS, "optimizer", "lr_scheduler"))
        module = cls.from_config(config, run_config=config, **kwargs)
        weights, _ = net_state_dict(ckpt, use_ema=False)
        module.net.load_state_dict(weights, strict=strict is not False)
        module.on_load_checkpoint(ckpt)
        return module.to(map_location or "cpu")

    # ------------------------------------------------------------------ inference helpers
    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None:
            return self.net(x_t, t)
        return self.net(x_t, t, class_labels=class_labels)

    def denoiser(self, use_ema: bool = True) -> nn.Module:
        """The network to sample with: the EMA copy when an EMA callback runs, else ``net``."""
        ema = find_ema(self._trainer) if use_ema else None
        return ema.ema_net if ema is not None else self.net

    # ------------------------------------------------------------------ training
    def _split_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """(x0, labels): labels of a class-conditional network's ``(x, labels)`` batch (also
        a :class:`CoupledBatch`), else None (an unconditional network ignores any labels the
        data carries)."""
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        if getattr(self.net, "null_class", None) is None:
            return x0, None
        if not isinstance(batch, (list, tuple)) or len(batch) < 2 or batch[1] is None:
            raise ValueError(
                f"the network is class-conditional (num_classes={self.net.null_class}) but the "
                "training batches carry no labels: train with data.conditional=true"
            )
        return x0, batch[1]

    def drop_labels(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): each label becomes
        the null class with probability ``p_uncond`` (one uniform draw per label)."""
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.p_uncond
        return torch.where(drop, torch.full_like(labels, int(self.net.null_class)), labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = self._split_batch(batch)
        position = (self.global_rank, self.current_epoch, batch_idx)
        seed_global_rngs(step_seed(self.train_seed, _GLOBAL_STREAM, *position))  # dropout
        g = seeded_generator(step_seed(self.train_seed, _NOISE_STREAM, *position), x0.device)
        t, weights = self.timestep_sampler.sample(x0.shape[0], x0.device, generator=g)
        if isinstance(batch, CoupledBatch):  # reflow: each x0 with its own noise (ddpm.data.pairs)
            noise = batch.noise
        else:
            noise = torch.randn(x0.shape, generator=g, device=x0.device)
        if labels is not None:  # after t and noise: those draws are the unconditional run's
            labels = self.drop_labels(labels, g)
        net = with_labels(self.__dict__["_train_net"], labels)
        terms = self.loss(net, self.diffusion, x0, t, noise)
        self.timestep_sampler.update(t, terms.get("vb", terms["loss"]).detach())
        loss = (terms["loss"] * weights).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/mse", terms["mse"].mean(), on_step=True, on_epoch=False)
        if "vb" in terms:
            self.log("train/vb", terms["vb"].mean(), on_step=True, on_epoch=False)
        if self.trainer is not None and (batch_idx % max(1, self.trainer.log_every_n_steps) == 0):
            self._log_quartiles("train", t, terms["loss"].detach())
        return loss

    def _log_quartiles(self, prefix: str, t: Tensor, per_sample: Tensor) -> None:
        """This step's loss by quartile of the time range (q0: least noise;
        ``Process.noise_quartile``)."""
        q = self.diffusion.noise_quartile(t)
        for i in range(QUARTILES):
            m = q == i
            cnt = m.sum()
            val = torch.where(cnt > 0, (per_sample * m).sum() / cnt.clamp(min=1), torch.nan)
            self.log(f"{prefix}/loss_q{i}", val, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ validation
    def _log_val_mean(self, name: str, per_sample: Tensor, weight: Tensor | None = None) -> None:
        """Add the samples' losses to the mean ``val/<name>`` (``weight``: which count)."""
        metric = self.val_means[name]
        metric.update(per_sample.detach(), 1.0 if weight is None else weight)
        self.log(f"val/{name}", metric, prog_bar=name in ("loss", "loss_ema"), on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0, labels = self._split_batch(batch)  # the conditional loss: no label dropout
        g = seeded_generator(step_seed(self.val_seed, self.global_rank, batch_idx), x0.device)
        t = self.timestep_sampler.validation_timesteps(x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        terms = self.loss(with_labels(self.net, labels), self.diffusion, x0, t, noise)
        self._log_val_mean("loss", terms["loss"])
        q = self.diffusion.noise_quartile(t)
        for i in range(QUARTILES):
            self._log_val_mean(f"loss_q{i}", terms["loss"], (q == i).to(terms["loss"].dtype))
        ema = find_ema(self._trainer)
        if ema is not None:
            ema_terms = self.loss(with_labels(ema.ema_net, labels), self.diffusion, x0, t, noise)
            self._log_val_mean("loss_ema", ema_terms["loss"])

    def on_validation_epoch_end(self) -> None:
        self.validated_step = self.global_step

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=self.net.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, also for fused optimizers under mixed precision."""
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the run config (plain data) and the timestep sampler's state (tensors: the
        importance sampler's loss history): the checkpoint stays ``weights_only``-loadable."""
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
        if hasattr(self.timestep_sampler, "state_dict"):
            state = self.timestep_sampler.state_dict()
            checkpoint[T_SAMPLER_KEY] = {k: torch.as_tensor(v) for k, v in state.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(T_SAMPLER_KEY)
        if state is not None and hasattr(self.timestep_sampler, "load_state_dict"):
            self.timestep_sampler.load_state_dict({k: v.numpy() for k, v in state.items()})
