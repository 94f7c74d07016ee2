"""Sample from a trained checkpoint (EMA weights by default).

    python src/sample.py ckpt_path=PATH sampler=ddim sampler.steps=50 num_samples=1000 batch_size=250 seed=0
    python src/sample.py ckpt_path=PATH sampler=dpm_solver sampler.steps=20 devices=4

Writes samples.npz (improved-diffusion's format: uint8 N x H x W x C under key arr_0), grid.png
and the config to its run directory and prints the path of samples.npz; `evaluate.py samples=...`
scores it. devices=N splits the samples over N processes (the same images as one).
"""

import hydra
from omegaconf import DictConfig

import ddpm.hydra_setup  # noqa: F401 - resolvers and U-Net presets, before Hydra composes
from ddpm.errors import reports_errors
from ddpm.tasks.sample import sample


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
@reports_errors
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
