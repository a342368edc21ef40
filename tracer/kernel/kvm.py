"""KVM and guest_memfd through their ioctls (numbers and structs in
kvm_abi.py): guest_memfd files, fallocate on them, and the capability probe
(``probe``: can this host make a guest_memfd with MMAP | INIT_SHARED, and if
not, why in one line).

Files are created the way a VMM preparing for a live update would
(``KVM_CREATE_GUEST_MEMFD`` with MMAP | INIT_SHARED, pre-allocated with
``fallocate(FALLOC_FL_KEEP_SIZE)``: mode 0 is refused), so the kernel's filemap
tracepoints see one real folio per 4 KiB page.  The VM that makes them, and
the stand-in a host without guest_memfd gets, are tracer.kernel.backing's.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from tracer.kernel import kvm_abi as abi
from tracer.kernel.host import libc


class GmemError(OSError):
    """guest_memfd could not be created or populated."""


def kernel_dev(st_dev: int) -> int:
    """Userspace dev_t -> the kernel's MKDEV(ma, mi) = ma << 20 | mi, as tracepoints show it."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if libc().fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise GmemError(err, f"fallocate(mode={mode:#x}, {offset}, {length}): {os.strerror(err)}")


@dataclass
class GmemFile:
    fd: int
    size: int
    ino: int
    dev: int  # kernel encoding

    def populate(self, offset: int = 0, length: Optional[int] = None) -> None:
        fallocate(self.fd, abi.FALLOC_FL_KEEP_SIZE, offset, self.size - offset if length is None else length)

    def punch(self, offset: int, length: int) -> None:
        fallocate(self.fd, abi.FALLOC_FL_KEEP_SIZE | abi.FALLOC_FL_PUNCH_HOLE, offset, length)


@dataclass(frozen=True)
class Support:
    """The capability probe's answer: OK, and in one line what works or why not."""
    ok: bool
    why: str
    flags: int = 0  # KVM_CAP_GUEST_MEMFD_FLAGS


@lru_cache(maxsize=None)
def probe(kvm_path: str = "/dev/kvm") -> Support:
    """Can this host create a default-type guest_memfd with MMAP|INIT_SHARED
    (what the reference model and the drivers make)?  Asked once a process."""
    if not os.path.exists(kvm_path):
        return Support(False, f"no {kvm_path} (no KVM on this host, or not passed into this container)")
    try:
        kvm = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        hint = " (run as root or in group kvm)" if e.errno in (errno.EACCES, errno.EPERM) else ""
        return Support(False, f"cannot open {kvm_path}: {e.strerror}{hint}")
    try:
        try:
            vm = fcntl.ioctl(kvm, abi.KVM_CREATE_VM, abi.KVM_X86_DEFAULT_VM)
        except OSError as e:
            return Support(False, f"KVM_CREATE_VM failed: {e.strerror}")
        try:
            def cap(c: int) -> int:
                try:
                    return fcntl.ioctl(vm, abi.KVM_CHECK_EXTENSION, c)
                except OSError:
                    return 0
            if cap(abi.KVM_CAP_GUEST_MEMFD) <= 0:
                return Support(False, "KVM_CAP_GUEST_MEMFD is 0: this host's KVM makes no guest_memfd")
            flags = cap(abi.KVM_CAP_GUEST_MEMFD_FLAGS)
            want = abi.GUEST_MEMFD_FLAG_MMAP | abi.GUEST_MEMFD_FLAG_INIT_SHARED
            if flags & want != want:
                return Support(False, f"this host's guest_memfd lacks MMAP|INIT_SHARED "
                                      f"(KVM_CAP_GUEST_MEMFD_FLAGS {flags:#x})", flags)
            try:
                os.close(fcntl.ioctl(vm, abi.KVM_CREATE_GUEST_MEMFD, abi.pack_create_guest_memfd(abi.PAGE_SIZE, want)))
            except OSError as e:
                return Support(False, f"KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED) failed: {e.strerror}", flags)
            return Support(True, f"this host makes guest_memfds (flags supported {flags:#x})", flags)
        finally:
            os.close(vm)
    finally:
        os.close(kvm)


