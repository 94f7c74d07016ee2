"""Interoperation with other diffusion libraries: :mod:`ddpm.interop.diffusers` maps our U-Net and
diffusion process onto diffusers' ``UNet2DModel`` and schedulers, and back.

Nothing here is imported by the rest of the package: diffusers stays an optional extra
(``pip install 'ddpm-lightning[diffusers]'``).
"""
