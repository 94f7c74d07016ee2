"""ddpm: denoising diffusion probabilistic models with PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
