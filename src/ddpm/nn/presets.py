"""Named U-Net configurations: ``PRESETS[name]`` are constructor kwargs of :class:`UNet` and
``unet_preset(name, **overrides)`` builds one. The one source of the architectures:
``conf/model/<name>.yaml`` takes them from here (registered as the Hydra group ``model/preset``),
so every key a config can override is spelled out."""

from __future__ import annotations

from typing import Any

from ddpm.nn.unet import UNet

__all__ = ["PRESETS", "unet_preset"]


# A preset's levels, in the order ``_ddpm`` takes them; the rest are DDPM's blocks (one attention
# head, additive timestep projection, conv resampling, 32 GroupNorm groups) unless it says.
_COLUMNS = (
    "in_channels",
    "image_size",
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "dropout",
)
_DDPM_BLOCKS: dict[str, Any] = dict(
    num_heads=1,
    num_head_channels=-1,
    use_scale_shift_norm=False,
    resblock_updown=False,
    norm_groups=32,
)


def _ddpm(*columns: Any, **blocks: Any) -> dict[str, Any]:
    """One preset's kwargs: ``columns`` as in ``_COLUMNS``, then the blocks."""
    return {**dict(zip(_COLUMNS, columns, strict=True)), **_DDPM_BLOCKS, **blocks}


PRESETS: dict[str, dict[str, Any]] = {
    # DDPM CIFAR-10 (Ho et al. 2020, App. B): 35.7M parameters.
    "cifar10": _ddpm(3, 32, 128, (1, 2, 2, 2), 2, (16,), 0.1),
    # improved-diffusion's CIFAR-10 U-Net (Nichol & Dhariwal 2021; its README's CIFAR-10 flags
    # --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 on the defaults
    # attention_resolutions 16,8, num_heads 4, use_scale_shift_norm): 52,546,438 parameters with
    # learned variances (6 output channels), as its UNetModel.
    "cifar10_iddpm": _ddpm(
        3, 32, 128, (1, 2, 2, 2), 3, (16, 8), 0.3, num_heads=4, use_scale_shift_norm=True
    ),
    # For unit tests on CPU (0.18M parameters).
    "tiny": _ddpm(3, 16, 16, (1, 2), 1, (8,), 0.0, norm_groups=8),
    # 8x8 sklearn digits upscaled to 16x16, for minutes of CPU training (1.1M parameters):
    # 16 -> 8 -> 4 with 32, 64, 64 channels, one ResBlock a level, attention at 8, no dropout
    # (short runs do not overfit); 16 groups keep 2+ channels a group.
    "digits": _ddpm(1, 16, 32, (1, 2, 2), 1, (8,), 0.0, norm_groups=16),
    # MNIST 28x28: 28 -> 14 -> 7, attention at 14.
    "mnist": _ddpm(1, 28, 64, (1, 2, 2), 2, (14,), 0.1),
    # CelebA 64x64: DDIM's CelebA-64 model (Song et al. 2021, configs/celeba.yml):
    # 64 -> 32 -> 16 -> 8 -> 4, attention at 16.
    "celeba64": _ddpm(3, 64, 128, (1, 2, 2, 2, 4), 2, (16,), 0.1),
    # DDPM LSUN / CelebA-HQ 256x256 (Ho et al. 2020, App. B): 114M parameters, no dropout.
    "lsun256": _ddpm(3, 256, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0),
}


def unet_preset(name: str, **overrides: Any) -> UNet:
    """Build the ``PRESETS[name]`` U-Net, with constructor kwargs overridden by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; allowed values: {sorted(PRESETS)}")
    return UNet(**{**PRESETS[name], **overrides})
