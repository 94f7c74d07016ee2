"""The composed config: as plain data (stored in checkpoints, logged to the trackers, compared on
a resume) and as a tree (rich), printed at start-up and kept in the run directory, as
lightning-hydra-template's ``print_config_tree`` does."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from ddpm.utils.distributed import is_launch_rank_zero

if TYPE_CHECKING:
    import rich.tree

TREE_FILE = "config_tree.log"
# The groups a reader looks for first; the other top-level keys follow in config order.
ORDER = (
    "data",
    "model",
    "schedule",
    "objective",
    "diffusion",
    "sampler",
    "optimizer",
    "lr_scheduler",
    "trainer",
    "callbacks",
    "logger",
    "paths",
)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config without ``hydra``, as plain data (dicts, lists, scalars)."""
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    return plain


def _text(cfg: DictConfig, key: str, resolve: bool) -> str:
    try:
        value = cfg[key]
        return (
            OmegaConf.to_yaml(value, resolve=resolve) if OmegaConf.is_config(value) else str(value)
        )
    except Exception:  # an interpolation that cannot resolve here: show it as written
        return OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [key]))


def config_tree(
    cfg: DictConfig, order: Sequence[str] = ORDER, resolve: bool = True
) -> rich.tree.Tree:
    """The config (without ``hydra``) as a rich tree: one branch of YAML per top-level key."""
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order and k != "hydra"]
    groups = [k for k in keys if OmegaConf.is_config(cfg._get_node(k))]
    for key in groups:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        branch.add(rich.syntax.Syntax(_text(cfg, str(key), resolve).rstrip(), "yaml"))
    scalars = [str(k) for k in keys if k not in groups]
    if scalars:
        text = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, scalars), resolve=resolve)
        branch = tree.add("(top level)", style="bold", guide_style="dim")
        branch.add(rich.syntax.Syntax(text.rstrip(), "yaml"))
    return tree


def print_config_tree(cfg: DictConfig, save_dir: str | Path | None = None) -> None:
    """Print the config tree (global rank 0 only) and write it to ``<save_dir>/config_tree.log``."""
    if not is_launch_rank_zero():
        return
    import rich.console

    tree = config_tree(cfg)
    rich.console.Console().print(tree)
    if save_dir is not None:
        path = Path(save_dir) / TREE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        rich.console.Console(file=buf, width=120, no_color=True).print(tree)
        path.write_text("\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n")
