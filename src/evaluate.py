"""Evaluate a checkpoint: NLL bound in bits/dim on the test split; FID / IS of samples.

    python src/evaluate.py ckpt_path=PATH
    python src/evaluate.py ckpt_path=PATH nll.num_images=1000 fid.num_samples=50000 sampler=ddim sampler.steps=100

Writes metrics.json to its run directory and prints it.
"""

import hydra
from omegaconf import DictConfig

import ddpm.config  # noqa: F401 - registers resolvers before Hydra composes
from ddpm.tasks.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
