"""Config-friendly samplers (``conf/sampler/*.yaml``): a sampling function and its options.

``sampler(net, diffusion, shape, *, generator, progress, return_intermediates, device, noise,
class_labels)`` calls the function with the options stored in the dataclass fields (named as
the function's keyword arguments). The options are validated once, when the sampler is built.
``compile=True`` (``sampler.compile=true``) samples with ``torch.compile(net)``, compiled once
per network and reused by later calls.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ddpm.diffusion.process import Process
from ddpm.diffusion.samplers._core import Net, SampleOutput, check_options
from ddpm.diffusion.samplers.ddim import ddim_sample
from ddpm.diffusion.samplers.ddpm import ddpm_sample
from ddpm.diffusion.samplers.dpm_solver import dpm_solver_sample
from ddpm.diffusion.samplers.heun import heun_sample
from ddpm.diffusion.samplers.timesteps import DPM_SPACINGS, STEP_SPACINGS
from ddpm.diffusion.samplers.unipc import unipc_sample


@dataclass
class Sampler:
    """Base of the config samplers: ``sample_fn`` with the dataclass fields as its options."""

    name: ClassVar[str] = ""
    sample_fn: ClassVar[Callable[..., SampleOutput]]
    spacings: ClassVar[Sequence[str]] = STEP_SPACINGS
    steps_optional: ClassVar[bool] = False
    # options every sampler has (keyword-only, after each sampler's own)
    clip_denoised: bool = field(default=True, kw_only=True)
    guidance_scale: float = field(default=1.0, kw_only=True)
    # predictor-corrector sampling (Song et al. 2021): "langevin" after every step, or None
    corrector: str | None = field(default=None, kw_only=True)
    snr: float = field(default=0.16, kw_only=True)
    corrector_steps: int = field(default=1, kw_only=True)
    compile: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        check_options(self.options(), self.spacings, self.steps_optional)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def options(self) -> dict[str, Any]:
        """The keyword arguments this sampler passes to ``sample_fn``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "compile"}

    def compiled(self, net: Net) -> Net:
        """``torch.compile(net)``, built on the first call for ``net`` and then reused."""
        try:
            if net not in self._compiled:
                self._compiled[net] = torch.compile(net)
            return self._compiled[net]
        except TypeError:  # not weak-referenceable (e.g. a bound method): compile every call
            return torch.compile(net)

    def __call__(
        self, net: Net, process: Process, shape: Sequence[int] | None, **common: Any
    ) -> SampleOutput:
        """``sample_fn(net, process, shape, **common, **options)``; ``common``: the call's
        ``generator``, ``progress``, ``return_intermediates``, ``device``, ``noise`` and
        ``class_labels`` (:class:`~ddpm.diffusion.samplers.SampleCall`)."""
        options = self.options()
        fixed = sorted(set(common) & set(options))
        if fixed:
            raise TypeError(
                f"{type(self).__name__}: {fixed} are this sampler's settings (its config), not "
                "arguments of a call"
            )
        net = self.compiled(net) if self.compile else net
        return type(self).sample_fn(net, process, shape, **common, **options)


@dataclass
class DDPMSampler(Sampler):
    """Ancestral DDPM sampling (:func:`ddpm_sample`); ``steps=None`` runs all T steps."""

    name: ClassVar[str] = "ddpm"
    sample_fn = staticmethod(ddpm_sample)
    steps_optional: ClassVar[bool] = True
    steps: int | None = None
    spacing: str = "auto"


@dataclass
class DDIMSampler(Sampler):
    """DDIM sampling (:func:`ddim_sample`): η = 0 deterministic, η = 1 DDPM-like."""

    name: ClassVar[str] = "ddim"
    sample_fn = staticmethod(ddim_sample)
    steps: int = 50
    eta: float = 0.0
    spacing: str = "auto"


@dataclass
class EulerSampler(Sampler):
    """Euler on the probability-flow ODE (:func:`ddim_sample` with η = 0: the same step on any
    process; rectified flow's and EDM's Euler sampler)."""

    name: ClassVar[str] = "euler"
    sample_fn = staticmethod(ddim_sample)
    steps: int = 20
    spacing: str = "auto"


@dataclass
class MultistepSampler(Sampler):
    """Base of the multistep solvers in λ = log(α/σ), DPM-Solver++ and UniPC: one grid
    (:func:`~ddpm.diffusion.samplers.timesteps.dpm_solver_timesteps`) and an order 1-3."""

    spacings: ClassVar[Sequence[str]] = DPM_SPACINGS
    steps: int = 20
    order: int = 2
    spacing: str = "auto"


@dataclass
class DPMSolverSampler(MultistepSampler):
    """DPM-Solver++ multistep sampling (:func:`dpm_solver_sample`): order 2 is DPM-Solver++(2M),
    3 is 3M; ``algorithm_type="sde-dpmsolver++"`` the SDE variant."""

    sample_fn = staticmethod(dpm_solver_sample)
    algorithm_type: str = "dpmsolver++"

    @property
    def name(self) -> str:  # type: ignore[override]
        return "dpm_solver_sde" if self.algorithm_type == "sde-dpmsolver++" else "dpm_solver"


@dataclass
class UniPCSampler(MultistepSampler):
    """UniPC predictor-corrector sampling (:func:`unipc_sample`)."""

    name: ClassVar[str] = "unipc"
    sample_fn = staticmethod(unipc_sample)
    steps: int = 10
    solver_type: str = "bh2"


@dataclass
class HeunSampler(Sampler):
    """EDM's Heun sampling (:func:`heun_sample`): ``steps`` N cost 2N - 1 network calls (2N - 2
    from α = 0)."""

    name: ClassVar[str] = "heun"
    sample_fn = staticmethod(heun_sample)
    steps: int = 10
    spacing: str = "auto"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None
    s_noise: float = 1.0
