"""The guest_memfd stand-in, for a host whose KVM makes no guest_memfd: an
O_TMPFILE on a private ramfs, filled through faults, so the kernel's filemap
tracepoints see the same order-0 folios.  Every output names it as such."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from typing import Optional

from tracer.base.private import private_dir, private_open
from tracer.base.units import PAGE_SIZE
from tracer.kernel import kvm_abi as abi
from tracer.kernel.host import libc
from tracer.kernel.kvm import GmemError, GmemFile, kernel_dev


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.11 lacks the name


class StandinFile(GmemFile):
    """A guest_memfd stand-in: an O_TMPFILE on the stand-in ramfs, SIZE
    long.  Populating it faults every page in through a shared mapping (ramfs
    has no fallocate): the same order-0 folios, the same filemap tracepoints.
    A punch can only take the file's tail (ramfs has no PUNCH_HOLE: it is a
    truncate and a re-extend), which is all the drivers punch."""

    def populate(self, offset: int = 0, length: Optional[int] = None) -> None:
        length = self.size - offset if length is None else length
        if length <= 0:
            return
        # Page by page, lowest index first, as a guest touching its memory in order
        # (a bulk copy into the mapping faulted it in whatever order memmove chose:
        # backwards when the source buffer happened to lie just below it).
        with mmap.mmap(self.fd, length, offset=offset) as m:
            try:
                m.madvise(MADV_POPULATE_WRITE)  # one call: write faults in ascending order
            except OSError:
                for at in range(0, length, PAGE_SIZE):
                    m[at] = 0

    def punch(self, offset: int, length: int) -> None:
        if offset + length != self.size:
            raise GmemError(errno.EOPNOTSUPP, f"a guest_memfd stand-in can only punch its tail "
                                              f"(asked {offset}+{length} of {self.size})")
        try:
            os.ftruncate(self.fd, offset)
            os.ftruncate(self.fd, self.size)
        except OSError as e:
            raise GmemError(e.errno, f"truncating a guest_memfd stand-in: {e.strerror}") from None


def standin_dir() -> str:
    """The stand-in ramfs, mounted once per boot (idempotent; a lock keeps
    two starts from stacking two mounts with two superblocks).  Its mount
    point is root's alone: a symlink or a file found there is refused, never
    mounted through."""
    try:
        private_dir(os.path.dirname(abi.STANDIN_DIR))
        lock = private_open(abi.STANDIN_LOCK)
    except OSError as e:
        raise GmemError(e.errno or errno.EPERM, f"guest_memfd stand-ins: {e.strerror or e}") from None
    with os.fdopen(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            private_dir(abi.STANDIN_DIR)
        except OSError as e:
            raise GmemError(e.errno or errno.EPERM, f"guest_memfd stand-ins: {e.strerror or e}") from None
        if _statfs_type(abi.STANDIN_DIR) != abi.RAMFS_MAGIC:
            if libc().mount(b"luotrace-gmem-standin", abi.STANDIN_DIR.encode(), b"ramfs",
                           0x2 | 0x4 | 0x8, b"mode=0700") != 0:  # MS_NOSUID | MS_NODEV | MS_NOEXEC
                err = ctypes.get_errno()
                raise GmemError(err, f"mounting the guest_memfd stand-in ramfs on {abi.STANDIN_DIR}: "
                                     f"{os.strerror(err)}")
    return abi.STANDIN_DIR


def _statfs_type(path: str) -> int:
    """statfs(2)'s f_type (os.statvfs does not give it)."""
    buf = ctypes.create_string_buffer(120)  # struct statfs, x86_64: f_type is its first word
    if libc().statfs(path.encode(), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")


def _mem_available() -> int:
    """Bytes the kernel says a new allocation can take (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def create_standin(size: int) -> StandinFile:
    if size <= 0 or size % abi.PAGE_SIZE:
        raise GmemError(22, f"guest_memfd size {size} is not a positive multiple of 4 KiB")
    avail = _mem_available()
    if size > avail * 3 // 4:  # ramfs pages are never swapped or reclaimed: the OOM killer would end it
        raise GmemError(errno.ENOMEM, f"a {size >> 20} MiB guest_memfd stand-in does not fit this host's memory "
                                      f"({avail >> 20} MiB available; ramfs cannot be swapped); use a smaller size")
    try:
        fd = os.open(standin_dir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
    except OSError as e:
        if isinstance(e, GmemError):
            raise
        raise GmemError(e.errno, f"creating a guest_memfd stand-in in {abi.STANDIN_DIR}: {e.strerror}") from None
    st = os.fstat(fd)
    return StandinFile(fd, size, st.st_ino, kernel_dev(st.st_dev))
