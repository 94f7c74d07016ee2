"""Diffusion math in plain torch: schedules, q/posterior, objectives, NLL bound and samplers."""

from ddpm.diffusion.gaussian import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    GaussianDiffusion,
    extract,
)
from ddpm.diffusion.losses import (
    DiffusionLoss,
    LossSecondMomentSampler,
    UniformSampler,
    discretized_gaussian_log_likelihood,
    mean_flat,
    min_snr_weight,
    normal_kl,
    vb_terms_bpd,
)
from ddpm.diffusion.nll import calc_bpd_loop, prior_bpd
from ddpm.diffusion.respace import SPACINGS, respace, space_timesteps
from ddpm.diffusion.samplers import (
    DPM_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    dpm_solver_timesteps,
)
from ddpm.diffusion.schedules import SCHEDULES, make_beta_schedule, rescale_zero_terminal_snr

__all__ = [
    "DPM_SPACINGS",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "SPACINGS",
    "VARIANCE_TYPES",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "DiffusionLoss",
    "GaussianDiffusion",
    "LossSecondMomentSampler",
    "UniformSampler",
    "calc_bpd_loop",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_sample",
    "dpm_solver_timesteps",
    "extract",
    "make_beta_schedule",
    "mean_flat",
    "min_snr_weight",
    "normal_kl",
    "prior_bpd",
    "rescale_zero_terminal_snr",
    "respace",
    "space_timesteps",
    "vb_terms_bpd",
]
