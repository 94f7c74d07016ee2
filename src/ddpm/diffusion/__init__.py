"""Diffusion math in plain torch: schedules, the process q and its posterior, training
objectives and the timesteps they train on, the NLL bound and samplers.

The network is ``net(x_t, t) -> output`` throughout; losses, the bound and samplers take it
first: ``loss(net, diffusion, x_start, t)``, ``calc_bpd_loop(net, diffusion, x_start)``,
``ddim_sample(net, diffusion, shape)``.
"""

from ddpm.diffusion.gaussian import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    GaussianDiffusion,
    extract,
)
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
from ddpm.diffusion.respace import SPACINGS, respace, space_timesteps
from ddpm.diffusion.samplers import (
    DPM_SPACINGS,
    HEUN_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    HeunSampler,
    UniPCSampler,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    dpm_solver_timesteps,
    heun_sample,
    heun_timesteps,
    karras_timesteps,
    sample_batches,
    unipc_sample,
)
from ddpm.diffusion.schedules import SCHEDULES, make_beta_schedule, rescale_zero_terminal_snr
from ddpm.diffusion.timestep_sampling import (
    LossSecondMomentTimestepSampler,
    TimestepSampler,
    UniformTimestepSampler,
)

__all__ = [
    "DPM_SPACINGS",
    "HEUN_SPACINGS",
    "LOSS_TYPES",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "SPACINGS",
    "VARIANCE_TYPES",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "DiffusionLoss",
    "GaussianDiffusion",
    "HeunSampler",
    "LossSecondMomentTimestepSampler",
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
    "heun_timesteps",
    "karras_timesteps",
    "make_beta_schedule",
    "mean_flat",
    "min_snr_weight",
    "normal_kl",
    "prior_bpd",
    "rescale_zero_terminal_snr",
    "respace",
    "sample_batches",
    "space_timesteps",
    "unipc_sample",
    "vb_terms_bpd",
]
