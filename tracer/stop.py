"""Signals that end a run: the live session's loop and serve's lingering
both stop on them, once, and detach cleanly."""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Dict


class StopSignals:
    """SIGINT/SIGTERM/SIGHUP/SIGQUIT handlers that ask the loop to stop, once
    (a hang-up or a quit ends the run cleanly, as SIGTERM does)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self) -> None:
        self.reason = ""
        self._old: Dict[int, object] = {}
        self._cleaning = False

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if not self._cleaning:
            self.reason = self.reason or name
            return
        if not self.reason:  # the run ended on its own; this one is kept: no lingering after the detach
            self.reason = name
            print(f"luotrace: {name} while detaching: stopping once detached; again to quit at once",
                  file=sys.stderr, flush=True)
            return
        print(f"luotrace: {name} again: quitting before the detach finished", file=sys.stderr, flush=True)
        quit_now(128 + signum)

    def quiet(self) -> None:
        """Cleanup begins: a first signal now is remembered (the run does
        not linger after it), a second one quits at once."""
        self._cleaning = True

    def arm(self) -> None:
        """Listen again (lingering after cleanup)."""
        self._cleaning = False

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


def quit_now(status: int) -> None:
    """Exit with STATUS at once, mid-detach.  The kernel removes a probe
    when the last reference to its fd goes, a grace period per uprobe
    (seconds for thirty): a child left holding the fds waits for that, so
    that this process, and the shell waiting on it, end now.  The recording
    is left as cut (the reader says so)."""
    parent = os.getpid()
    try:
        if os.fork() == 0:
            try:
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)  # the caller's pipes and terminal are released now
                while os.getppid() == parent:  # the parent's exit must not be the last release
                    time.sleep(0.01)
            finally:
                os._exit(0)
    except OSError:
        pass  # no fork: exit holding them
    os._exit(status)
