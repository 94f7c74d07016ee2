"""Score generated images (FID, IS, KID, precision/recall) and a checkpoint's NLL (bits/dim).

    python src/evaluate.py samples=PATH.npz ref=cifar10-train      # a sample file, no checkpoint
    python src/evaluate.py ckpt_path=PATH num_samples=50000 devices=8   # sample here; + test NLL
    python src/evaluate.py ckpt_path=PATH metrics.enabled=false        # the NLL only

Writes metrics.json to its run directory and prints it (see conf/evaluate.yaml).
"""

import hydra
from omegaconf import DictConfig

import ddpm.hydra_setup  # noqa: F401 - resolvers and U-Net presets, before Hydra composes
from ddpm.errors import reports_errors
from ddpm.tasks.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@reports_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
