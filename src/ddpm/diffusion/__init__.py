"""Diffusion math in plain torch: one family of processes x_t = α(t) x₀ + σ(t) ε (DDPM's
discrete chain, EDM's, rectified flow) with the network's parameterisations, the training
objectives and the times they train on, DDPM's NLL bound and the samplers.

The network is ``net(x_t, τ) -> output`` throughout; losses, the bound and samplers take it
first: ``loss(net, process, x_start, t)``, ``calc_bpd_loop(net, diffusion, x_start)``,
``ddim_sample(net, process, shape)``.
"""

from ddpm.diffusion.continuous import EDMProcess, RectifiedFlow
from ddpm.diffusion.gaussian import DISCRETE_PREDICTION_TYPES, GaussianDiffusion, extract
from ddpm.diffusion.likelihood import pf_ode_nll, process_nll
from ddpm.diffusion.losses import (
    LOSS_TYPES,
    DiffusionLoss,
    discretized_gaussian_log_likelihood,
    mean_flat,
    min_snr_weight,
    normal_kl,
    vb_terms_bpd,
)
from ddpm.diffusion.nll import calc_bpd_loop, prior_bpd
from ddpm.diffusion.parameterisation import (
    PREDICTION_TYPES,
    Preconditioning,
    preconditioning,
)
from ddpm.diffusion.process import VARIANCE_TYPES, Process
from ddpm.diffusion.respace import SPACINGS, respace, space_timesteps
from ddpm.diffusion.samplers import (
    DPM_SPACINGS,
    STEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerSampler,
    HeunSampler,
    UniPCSampler,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    dpm_solver_timesteps,
    heun_sample,
    karras_timesteps,
    sample_batches,
    step_timesteps,
    unipc_sample,
)
from ddpm.diffusion.schedules import SCHEDULES, make_beta_schedule, rescale_zero_terminal_snr
from ddpm.diffusion.timestep_sampling import (
    ContinuousTimestepSampler,
    DiscreteTimestepSampler,
    FlowTimestepSampler,
    LogNormalTimestepSampler,
    LossSecondMomentTimestepSampler,
    TimestepSampler,
    UniformTimestepSampler,
)

__all__ = [
    "DISCRETE_PREDICTION_TYPES",
    "DPM_SPACINGS",
    "LOSS_TYPES",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "SPACINGS",
    "STEP_SPACINGS",
    "VARIANCE_TYPES",
    "ContinuousTimestepSampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "DiffusionLoss",
    "DiscreteTimestepSampler",
    "EDMProcess",
    "EulerSampler",
    "FlowTimestepSampler",
    "GaussianDiffusion",
    "HeunSampler",
    "LogNormalTimestepSampler",
    "LossSecondMomentTimestepSampler",
    "Preconditioning",
    "Process",
    "RectifiedFlow",
    "TimestepSampler",
    "UniPCSampler",
    "UniformTimestepSampler",
    "calc_bpd_loop",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_sample",
    "dpm_solver_timesteps",
    "extract",
    "heun_sample",
    "karras_timesteps",
    "make_beta_schedule",
    "mean_flat",
    "min_snr_weight",
    "normal_kl",
    "preconditioning",
    "pf_ode_nll",
    "prior_bpd",
    "process_nll",
    "rescale_zero_terminal_snr",
    "respace",
    "sample_batches",
    "space_timesteps",
    "step_timesteps",
    "unipc_sample",
    "vb_terms_bpd",
]
