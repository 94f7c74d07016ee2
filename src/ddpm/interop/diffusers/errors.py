"""What goes wrong in interop: a counterpart that does not exist, or diffusers not installed."""

from __future__ import annotations

from typing import Any

from ddpm.errors import ConfigError

__all__ = ["InteropError", "require_diffusers"]

INSTALL_HINT = "pip install 'ddpm-lightning[diffusers]' (or pip install diffusers)"


class InteropError(ConfigError):
    """A network, process or folder with no exact counterpart on the other side."""


def require_diffusers() -> Any:
    """The ``diffusers`` module, or an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"this needs the optional dependency diffusers: {INSTALL_HINT}") from e
    return diffusers
