"""The files luotrace writes for a user (recordings, timelines, plots,
textfiles): regular files only, never a device or FIFO a write or rename
would replace; an existing one only with --force; locked while written."""
from __future__ import annotations

import fcntl
import os
import stat
from typing import BinaryIO

from tracer.base.errors import LuotraceError


def check_output(path: str, force: bool = False, what: str = "output") -> None:
    """Refuse, before any work, an output luotrace must not write: anything
    but a regular file (a device, FIFO or directory), or an existing file
    without FORCE."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise LuotraceError(f"cannot write {what} {path}: {e.strerror}", "choose another path") from None
    if not stat.S_ISREG(st.st_mode):
        raise LuotraceError(f"{what} {path} is not a regular file", "luotrace writes regular files only: choose another path")
    if not force:
        raise LuotraceError(f"{what} {path} already exists", "pass --force to overwrite it, or choose another path")


def open_output(path: str, force: bool = False, what: str = "output") -> BinaryIO:
    """An output file luotrace may write (see check_output), locked
    exclusively while open so that two luotraces never write one file."""
    check_output(path, force, what)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (0 if force else os.O_EXCL), 0o644)
    except FileExistsError:
        raise LuotraceError(f"{what} {path} already exists", "pass --force to overwrite it, or choose another path") from None
    except OSError as e:
        raise LuotraceError(f"cannot write {what} {path}: {e.strerror}", "choose a writable path") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LuotraceError(f"another luotrace is writing {path}", "choose another path") from None
    except OSError:
        pass  # a filesystem without locks (some 9p mounts): written unlocked
    os.ftruncate(fd, 0)
    return os.fdopen(fd, "wb")


def write_output(path: str, data: bytes, what: str = "output") -> None:
    """A whole output file (a timeline, a plot) written at once: a regular
    file or none before (an existing one is replaced, a device or FIFO never
    is), through a temporary file renamed over it, so a failed write leaves
    no partial file."""
    check_output(path, force=True, what=what)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise LuotraceError(f"cannot write {what} {path}: {e.strerror}", "choose a writable path") from None
