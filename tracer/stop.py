"""Signals that end a run: the live session's loop and serve's lingering
both stop on them, once, and detach cleanly."""
from __future__ import annotations

import signal
from typing import Dict


class StopSignals:
    """SIGINT/SIGTERM/SIGHUP/SIGQUIT handlers that ask the loop to stop, once
    (a hang-up or a quit ends the run cleanly, as SIGTERM does)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self) -> None:
        self.reason = ""
        self._old: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, _frame) -> None:
        if not self.reason:
            self.reason = signal.Signals(signum).name

    def quiet(self) -> None:
        """During cleanup further signals are ignored (no half-detached state)."""
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)

    def arm(self) -> None:
        """Listen again (lingering after cleanup)."""
        for sig in self._old:
            signal.signal(sig, self._handler)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
