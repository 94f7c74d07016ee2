"""Where this project's files are, for a checkout and for an installed package alike.

- The configs: a checkout's top-level ``conf/``; an installed package's copy of it, the package
  ``ddpm.conf`` (``pkg://ddpm.conf``, shipped by ``setup.py``).
- The root that ``outputs/``, ``data/`` and ``.cache/`` resolve against (``paths.root_dir``):
  ``$DDPM_ROOT`` if set (``conf/paths/default.yaml``), else the checkout's root, else (an
  installed package) the directory the command runs in. A path typed on the command line
  (``run_dir=``, ``ckpt_path=``, ``data.root=``) is relative to the current directory, as usual.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_PACKAGE = "ddpm.conf"


def checkout_root() -> Path | None:
    """The repository root when the package is ``<root>/src/ddpm`` beside ``<root>/conf``
    (``python src/train.py``, an editable install, the tests); None for an installed package."""
    root = PACKAGE_DIR.parents[1]
    if PACKAGE_DIR.parent.name == "src" and (root / "conf" / "train.yaml").is_file():
        return root
    return None


def conf_dir() -> Path:
    """The config files on disk: the checkout's ``conf/`` or the installed package's copy."""
    root = checkout_root()
    return root / "conf" if root is not None else PACKAGE_DIR / "conf"


def config_path() -> str:
    """The primary config directory for ``hydra.main``: the checkout's ``conf/`` or the installed
    package's ``pkg://ddpm.conf``."""
    return str(conf_dir()) if checkout_root() is not None else f"pkg://{CONF_PACKAGE}"


def command(task: str) -> str:
    """How a user launches ``task`` (train, sample, ...) here: ``python src/<task>.py`` in a
    checkout, the console script ``ddpm-<task>`` of an installed package; what messages print."""
    return f"python src/{task}.py" if checkout_root() is not None else f"ddpm-{task}"


def project_root() -> str:
    """The default ``paths.root_dir`` (without ``$DDPM_ROOT``): the checkout's root, or the current
    directory for an installed package."""
    return str(checkout_root() or Path.cwd())
