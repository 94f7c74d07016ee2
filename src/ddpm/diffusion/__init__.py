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
from ddpm.diffusion.schedules import SCHEDULES, make_beta_schedule, rescale_zero_terminal_snr

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULES",
    "VARIANCE_TYPES",
    "DiffusionLoss",
    "GaussianDiffusion",
    "LossSecondMomentSampler",
    "UniformSampler",
    "calc_bpd_loop",
    "discretized_gaussian_log_likelihood",
    "extract",
    "make_beta_schedule",
    "mean_flat",
    "min_snr_weight",
    "normal_kl",
    "prior_bpd",
    "rescale_zero_terminal_snr",
    "vb_terms_bpd",
]
