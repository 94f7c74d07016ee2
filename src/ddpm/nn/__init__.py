"""Networks ``forward(x_t, t, class_labels=None) -> output``; they know nothing of noise
schedules."""

from ddpm.nn.embeddings import broadcast_timesteps, timestep_embedding
from ddpm.nn.mlp import MLPDenoiser
from ddpm.nn.presets import PRESETS, unet_preset
from ddpm.nn.unet import UNet, count_parameters

__all__ = [
    "PRESETS",
    "MLPDenoiser",
    "UNet",
    "broadcast_timesteps",
    "count_parameters",
    "timestep_embedding",
    "unet_preset",
]
