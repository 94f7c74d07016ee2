"""The project's configuration error, in a leaf module so that every layer may raise it. (A bad
checkpoint raises :class:`ddpm.checkpoint.CheckpointError`, next to the checkpoint format.)"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem found before any work started."""
