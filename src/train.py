"""Train a diffusion model.

python src/train.py                                   # digits on the CPU, a few minutes
python src/train.py schedule=cosine trainer.devices=4 # any config group or Trainer arg
python src/train.py experiment=cifar10_ddpm trainer.devices=4
python src/train.py -m schedule=linear,cosine         # Hydra multirun sweep
python src/train.py run_dir=outputs/train/runs/X ckpt_path=last   # resume run X
"""

import hydra
from omegaconf import DictConfig

import ddpm.hydra_setup  # noqa: F401 - resolvers and U-Net presets, before Hydra composes
from ddpm.errors import reports_errors
from ddpm.tasks.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@reports_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
