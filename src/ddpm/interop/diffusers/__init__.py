"""Our U-Net and diffusion process <-> diffusers' ``UNet2DModel`` and ``DDPMScheduler``.

Export (``python src/export.py ckpt_path=PATH format=diffusers out=DIR``) writes a pipeline folder
that ``DDPMPipeline.from_pretrained(DIR)`` and ``DDIMPipeline.from_pretrained(DIR)`` load without
this package. Import reads a diffusers folder into our :class:`~ddpm.nn.UNet`:
``python src/train.py model=diffusers model.path=DIR`` fine-tunes it (:func:`unet_from_pretrained`)
and ``python src/export.py ckpt_path=DIR out=model.safetensors`` writes one of our checkpoints.

Our ``UNet`` arguments and the ``UNet2DModel`` config they become:

    model_channels * channel_mult     block_out_channels (channel_mult[0] must be 1)
    num_res_blocks                    layers_per_block
    attention_resolutions             AttnDownBlock2D / AttnUpBlock2D at those levels (middle: always)
    num_heads, num_head_channels      attention_head_dim (None: one head in every block)
    use_scale_shift_norm              resnet_time_scale_shift="scale_shift"
    resblock_updown                   ResnetDownsampleBlock2D / ResnetUpsampleBlock2D, "resnet" types
    norm_groups                       norm_num_groups and attn_norm_num_groups
    num_classes = K                   num_class_embeds = K + 1 (class_embed_type None; K = null)
    dropout, norm_eps, downsample_padding, flip_sin_to_cos, freq_shift: the same names

The weights correspond one to one (our fused qkv projection is diffusers' to_q, to_k, to_v), so
a round trip is bit-identical. What has no counterpart is refused with :class:`InteropError`
naming it, never converted into a different model. Everything here needs diffusers
(``pip install 'ddpm-lightning[diffusers]'``), imported when first used.

Parts: ``configs`` (the table above), ``weights`` (state_dict keys), ``networks`` (module
objects and diffusers folders), ``scheduler`` (process <-> scheduler config, sampler spacings),
``model_card`` (the exported folder's README.md), ``errors``.
"""

from ddpm.interop.diffusers.configs import unet_from_diffusers_config, unet_to_diffusers_config
from ddpm.interop.diffusers.errors import InteropError, require_diffusers
from ddpm.interop.diffusers.model_card import model_card
from ddpm.interop.diffusers.networks import (
    from_diffusers_unet,
    load_unet,
    to_diffusers_unet,
    unet_from_pretrained,
)
from ddpm.interop.diffusers.scheduler import (
    TIMESTEP_SPACINGS,
    diffusion_from_scheduler_config,
    scheduler_config,
)
from ddpm.interop.diffusers.weights import state_dict_from_diffusers, state_dict_to_diffusers

__all__ = [
    "TIMESTEP_SPACINGS",
    "InteropError",
    "diffusion_from_scheduler_config",
    "from_diffusers_unet",
    "load_unet",
    "model_card",
    "require_diffusers",
    "scheduler_config",
    "state_dict_from_diffusers",
    "state_dict_to_diffusers",
    "to_diffusers_unet",
    "unet_from_diffusers_config",
    "unet_from_pretrained",
    "unet_to_diffusers_config",
]
