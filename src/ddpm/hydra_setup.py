"""What Hydra needs before it composes ``conf/``: the OmegaConf resolvers the YAML uses and the
U-Net presets as the config group ``model/preset``. Importing this module registers both; the
entry scripts (``src/*.py``), the tests and a notebook that composes import it first::

    import ddpm.hydra_setup  # noqa: F401
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ddpm.diffusion.process import model_output_channels
from ddpm.nn import PRESETS
from ddpm.project import project_root
from ddpm.run.directory import launch_subdir


def _first_not_none(*values: Any) -> Any:
    for v in values:
        if v is not None and v != "None" and v != "null":
            return v
    return None


def _model_out_channels(channels: int, variance_type: str) -> int:
    return model_output_channels(int(channels), str(variance_type))


def _launch_subdir(output_dir: str) -> str:
    return launch_subdir(str(output_dir))


def register_resolvers() -> None:
    """Register the resolvers the YAML uses, each one what OmegaConf cannot express itself:
    ``${ddpm_first:a,b}`` (the first value that is not null: ``oc.select`` returns a null as is),
    ``${model_out_channels:C,variance_type}`` (the network's output channels for the objective:
    :func:`ddpm.diffusion.process.model_output_channels`) and
    ``${ddpm_launch_subdir:run_dir}`` (looks at the run directory:
    :func:`ddpm.run.directory.launch_subdir`) and ``${ddpm_project_root:}`` (the default root of
    ``outputs/``, ``data/`` and caches: :func:`ddpm.project.project_root`)."""
    if not OmegaConf.has_resolver("ddpm_first"):
        OmegaConf.register_new_resolver("ddpm_first", _first_not_none)
    if not OmegaConf.has_resolver("model_out_channels"):
        OmegaConf.register_new_resolver("model_out_channels", _model_out_channels)
    if not OmegaConf.has_resolver("ddpm_launch_subdir"):
        OmegaConf.register_new_resolver("ddpm_launch_subdir", _launch_subdir)
    if not OmegaConf.has_resolver("ddpm_project_root"):
        OmegaConf.register_new_resolver("ddpm_project_root", project_root)


def register_model_presets() -> None:
    """Register :data:`ddpm.nn.PRESETS` as the Hydra config group ``model/preset``: the U-Net
    options ``conf/model/<name>.yaml`` take their architecture from it (``- preset/<name>@_here_``
    in their defaults), so it is written once, in the code that builds the network."""
    store = ConfigStore.instance()
    for name, kwargs in PRESETS.items():
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        store.store(group="model/preset", name=name, node=plain)


register_resolvers()
register_model_presets()
