"""KVM and guest_memfd through their ioctls (numbers and structs in
kvm_abi.py): a VM, its guest_memfds, fallocate on them.  The tracer needs it
to learn the guest_memfd superblock's dev_t (the population probes' filter)
and `doctor` to check KVM; the workload drivers build on it.

Files are created the way a VMM preparing for a live update would
(``KVM_CREATE_GUEST_MEMFD`` with MMAP | INIT_SHARED, pre-allocated with
``fallocate(FALLOC_FL_KEEP_SIZE)``: mode 0 is refused), so the kernel's filemap
tracepoints see one real folio per 4 KiB page.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
from dataclasses import dataclass
from typing import List, Optional

from . import kvm_abi as abi

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class GmemError(OSError):
    """guest_memfd could not be created or populated."""


def kernel_dev(st_dev: int) -> int:
    """Userspace dev_t -> the kernel's MKDEV(ma, mi) = ma << 20 | mi, as tracepoints show it."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
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


class VM:
    """A KVM VM owning guest_memfds; close() releases everything."""

    def __init__(self, kvm_path: str = "/dev/kvm", vm_type: int = abi.KVM_X86_DEFAULT_VM):
        try:
            self._kvm = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise GmemError(e.errno, f"open {kvm_path}: {e.strerror}") from None
        try:
            self.fd = fcntl.ioctl(self._kvm, abi.KVM_CREATE_VM, vm_type)
        except OSError as e:
            os.close(self._kvm)
            raise GmemError(e.errno, f"KVM_CREATE_VM(type={vm_type}): {e.strerror}") from None
        self.files: List[GmemFile] = []

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on this VM; 0 when the kernel does not know CAP."""
        try:
            return fcntl.ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def supported_flags(self) -> int:
        return self.check_extension(abi.KVM_CAP_GUEST_MEMFD_FLAGS)

    def create_gmem(self, size: int,
                    flags: int = abi.GUEST_MEMFD_FLAG_MMAP | abi.GUEST_MEMFD_FLAG_INIT_SHARED) -> GmemFile:
        if size <= 0 or size % abi.PAGE_SIZE:
            raise GmemError(22, f"guest_memfd size {size} is not a positive multiple of 4 KiB")
        arg = abi.pack_create_guest_memfd(size, flags)
        try:
            fd = fcntl.ioctl(self.fd, abi.KVM_CREATE_GUEST_MEMFD, arg)
        except OSError as e:
            raise GmemError(e.errno, f"KVM_CREATE_GUEST_MEMFD(size={size}, flags={flags:#x}): {e.strerror}") from None
        st = os.fstat(fd)
        f = GmemFile(fd, size, st.st_ino, kernel_dev(st.st_dev))
        self.files.append(f)
        return f

    def close(self) -> None:
        for f in self.files:
            os.close(f.fd)
        self.files.clear()
        for fd in (self.fd, self._kvm):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gmem_superblock_dev(kvm_path: str = "/dev/kvm") -> int:
    """The kernel dev_t of the guest_memfd superblock: the population filter."""
    with VM(kvm_path) as vm:
        return vm.create_gmem(abi.PAGE_SIZE, 0).dev
