"""Stop a long loop between two of its steps on Ctrl-C or SIGTERM (a scheduler's preemption)
instead of in the middle: :class:`StopSignals` records the signal; the loop asks
``signum`` between steps and keeps what it has done. A second Ctrl-C aborts at once
(``KeyboardInterrupt``). Training has its own, collective version
(:mod:`ddpm.callbacks.preemption`)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = ("SIGINT", "SIGTERM")


class StopSignals:
    """While active (a ``with`` block, in the main thread), SIGINT and SIGTERM set
    :attr:`signum` instead of ending the process; the former handlers come back after."""

    def __init__(self, signals: tuple[str, ...] = STOP_SIGNALS) -> None:
        self.signals = tuple(getattr(signal, name) for name in signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            self._restore()
            raise KeyboardInterrupt  # a second Ctrl-C: out now
        self.signum = int(signum) if self.signum is None else self.signum

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()
