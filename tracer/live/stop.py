"""Signals that end a run: the live session's loop and serve's lingering
both stop on them, once, and detach cleanly."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
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
            if not self.reason:
                self.reason = name
                return
            # a second one before the loop has seen the first (compiling, attaching): quit now
            print(f"luotrace: {name} again: quitting now", file=sys.stderr, flush=True)
            quit_now(128 + signum)
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
    # libc's own calls, holding the GIL throughout: os.fork() would run
    # Python's at-fork handlers, which wait on locks the detaching threads may
    # hold, and any call that releases the GIL may find it locked for good in
    # the child by a thread that no longer exists there.
    _keep_only_probe_fds()
    libc = ctypes.PyDLL(None)
    parent = libc.getpid()
    pid = libc.fork()
    if pid == 0:
        libc.setsid()
        null = libc.open(b"/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            libc.dup2(null, fd)  # the caller's pipes and terminal are released now
        while libc.getppid() == parent:  # the parent's exit must not be the last release
            libc.usleep(10000)
        libc._exit(0)
    os._exit(status)


def _keep_only_probe_fds() -> None:
    """Close every fd above stdio but the BPF and perf ones (anon inodes):
    the listening socket and the recording must not outlive this process
    in the child (a restarted serve would find its port taken)."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        try:
            if fd > 2 and not os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:"):
                os.close(fd)
        except OSError:
            pass
