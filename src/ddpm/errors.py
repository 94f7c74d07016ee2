"""The project's errors a user can act on, in a leaf module so that every layer may raise them,
and how the entry points report them: the message, not a traceback.

* :class:`ConfigError`: a setting (or a file it names) that cannot work; the message names the
  setting and what is allowed. (A bad checkpoint raises :class:`ddpm.checkpoint.CheckpointError`,
  a ``ConfigError`` next to the checkpoint format.)
* :class:`DataError`: the data a config points at cannot be used as asked (a missing or empty
  folder, a class folder without images, unreadable files, a data set that cannot be downloaded).
* :func:`reports_errors`: the entry points' task functions print these as one message and exit
  with code 1; ``HYDRA_FULL_ERROR=1`` shows the traceback (Hydra's switch for its own errors).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

Task = TypeVar("Task", bound=Callable[..., Any])


class ConfigError(ValueError):
    """A setting, or a file or data it names, cannot work: the message names it."""


class DataError(ConfigError):
    """The data a config points at cannot be used as asked; the message names the setting or
    the file."""


def user_error(error: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` behind ``error`` (itself, or what Hydra's ``instantiate``
    wrapped), None for any other exception (a bug: its traceback is wanted)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__  # type: ignore[assignment]
    return None


def reports_errors(task: Task) -> Task:
    """Wrap an entry point's task function: a :class:`ConfigError` (wherever it is raised, also
    inside the fit) ends the process with its message (logged, so it is in the run's log too)
    and exit code 1 instead of a traceback, unless ``HYDRA_FULL_ERROR=1``."""

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as e:
            found = user_error(e)
            if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s\n(HYDRA_FULL_ERROR=1 shows the traceback.)", found)
            raise SystemExit(1) from None

    return run  # type: ignore[return-value]
