"""Export a checkpoint: our safetensors (default) or a diffusers pipeline folder; import one.

python src/export.py ckpt_path=PATH out=model.safetensors
python src/sample.py ckpt_path=model.safetensors sampler=ddim
python src/export.py ckpt_path=PATH format=diffusers out=DIR   # DDPMPipeline.from_pretrained(DIR)
python src/export.py ckpt_path=DIR out=model.safetensors        # import a diffusers pipeline
"""

import hydra
from omegaconf import DictConfig

import ddpm.hydra_setup  # noqa: F401 - resolvers and U-Net presets, before Hydra composes
from ddpm.errors import reports_errors
from ddpm.tasks.export import export


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@reports_errors
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
