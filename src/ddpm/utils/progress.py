"""Progress of long loops (sampling, feature extraction, the NLL): a rich bar with elapsed time
and ETA on a terminal; where the output is not a terminal (SLURM logs, ``nohup``, ``> log``),
plain lines through ``logging``, as training prints them (:mod:`ddpm.callbacks.progress`)::

    sampling: 640/50000 images (1%) | 12.5 images/s | elapsed 0:00:51 | ETA 1:05:50
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

LINE_EVERY_S = 30.0  # a plain line at the first update, then at most this often, and at the end


def hms(seconds: float) -> str:
    """``H:MM:SS`` of a duration."""
    return str(datetime.timedelta(seconds=round(seconds)))


def is_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """``done/total`` of a loop in ``unit`` (images, batches, ...): call :meth:`advance` with
    the amount done. A rich bar on a terminal (``bar``: None = when stderr is one), plain
    ``logging`` lines otherwise (``lines``: only for loops long enough to report, e.g. not a
    sampler's steps inside a batch); nothing when not ``enabled``. Speed and ETA count what
    this loop did over its wall time."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "batches",
        enabled: bool = True,
        lines: bool = True,
        bar: bool | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.bar = enabled and (is_terminal() if bar is None else bar)
        self.lines = enabled and lines and not self.bar
        self.done = 0
        self._last_done = -1  # done at the last line
        self._start = self._last_line = time.monotonic()
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        if self.bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._rich = RichProgress(*columns, console=Console(file=sys.stderr), transient=True)
            self._rich.__enter__()
            self._task = self._rich.add_task(self.desc, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None
        elif self.lines and exc[0] is None and self.done != self._last_done:
            self._line()  # where the loop ended

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        if self._rich is not None:
            self._rich.advance(self._task, n)
            return
        if not self.lines:
            return
        now = time.monotonic()
        first = self._last_done < 0
        finished = self.total is not None and self.done >= self.total
        if first or finished or now - self._last_line >= LINE_EVERY_S:
            self._line()

    def line(self) -> str:
        """The plain line describing the progress now."""
        elapsed = time.monotonic() - self._start
        if self.total:
            parts = [
                f"{self.desc}: {self.done}/{self.total} {self.unit} "
                f"({100 * self.done / self.total:.0f}%)"
            ]
        else:
            parts = [f"{self.desc}: {self.done} {self.unit}"]
        if elapsed > 0:
            parts.append(f"{self.done / elapsed:.3g} {self.unit}/s")
        parts.append(f"elapsed {hms(elapsed)}")
        if self.total and self.done:
            parts.append(f"ETA {hms(elapsed / self.done * max(0, self.total - self.done))}")
        return " | ".join(parts)

    def _line(self) -> None:
        log.info(self.line())
        self._last_line, self._last_done = time.monotonic(), self.done


def progress_iter(
    it: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "batches",
    size: Callable[[T], int] | None = None,
    lines: bool = False,
) -> Iterator[T]:
    """Yield from ``it`` with a :class:`Progress` when ``enabled``: each item counts ``size(item)``
    (default 1) of ``total`` ``unit``; ``lines``: also plain lines off a terminal."""
    if not enabled:
        yield from it
        return
    with Progress(total, desc, unit, lines=lines) as progress:
        for item in it:
            yield item
            progress.advance(1 if size is None else size(item))
