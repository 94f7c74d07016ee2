"""Pictures of diffusion (PNG files in the run directory; see ddpm.tasks.visualize).

    python src/visualize.py what=forward data=digits 'schedules=[linear,cosine]'
    python src/visualize.py what=reverse ckpt_path=PATH sampler=ddim sampler.steps=50
    python src/visualize.py what=loss_by_t ckpt_path=PATH
    python src/visualize.py what=interpolate ckpt_path=PATH interpolate.pair=[3,7]
    python src/visualize.py what=playground ckpt_path=PATH   # a 2-D run (experiment=swiss_roll)

`schedules` is a list (schedules=[linear,cosine]); `schedule=linear,cosine` is a Hydra sweep and
does not work without -m. Prints the paths of the PNGs written.
"""

import hydra
from omegaconf import DictConfig

import ddpm.hydra_setup  # noqa: F401 - resolvers and U-Net presets, before Hydra composes
from ddpm.errors import reports_errors
from ddpm.tasks.visualize import visualize


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
@reports_errors
def main(cfg: DictConfig) -> None:
    visualize(cfg)


if __name__ == "__main__":
    main()
