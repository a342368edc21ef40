"""What a run's guest_memfd files are, real or stand-ins (the policy:
``choose``, forced by --gmem or $LUOTRACE_GMEM), and the VM that makes them
that way: its guest_memfds come from KVM, or from tracer.kernel.standin."""
from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from tracer.base.errors import LuotraceError
from tracer.kernel import kvm_abi as abi
from tracer.kernel.kvm import GmemError, GmemFile, kernel_dev, probe
from tracer.kernel.standin import create_standin, standin_dir


class VM:
    """A KVM VM owning guest_memfds; close() releases everything.  With a
    stand-in BACKING (``choose()`` by default) its guest_memfds are
    StandinFiles and no KVM is opened."""

    def __init__(self, kvm_path: str = "/dev/kvm", vm_type: int = abi.KVM_X86_DEFAULT_VM,
                 backing: Optional["Backing"] = None):
        self.backing = backing or choose()
        self.files: List[GmemFile] = []
        self._kvm = self.fd = -1
        if self.backing.standin:
            return
        try:
            self._kvm = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise GmemError(e.errno, f"open {kvm_path}: {e.strerror}") from None
        try:
            self.fd = fcntl.ioctl(self._kvm, abi.KVM_CREATE_VM, vm_type)
        except OSError as e:
            os.close(self._kvm)
            raise GmemError(e.errno, f"KVM_CREATE_VM(type={vm_type}): {e.strerror}") from None

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on this VM; 0 when the kernel does not know CAP
        (or this VM is a stand-in's, with no KVM behind it)."""
        if self.fd < 0:
            return 0
        try:
            return fcntl.ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def supported_flags(self) -> int:
        return self.check_extension(abi.KVM_CAP_GUEST_MEMFD_FLAGS)

    def create_gmem(self, size: int,
                    flags: int = abi.GUEST_MEMFD_FLAG_MMAP | abi.GUEST_MEMFD_FLAG_INIT_SHARED) -> GmemFile:
        if self.backing.standin:
            f: GmemFile = create_standin(size)
            self.files.append(f)
            return f
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
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self._kvm = -1

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gmem_superblock_dev(backing: Optional["Backing"] = None) -> int:
    """The kernel dev_t of the superblock the guest_memfd files of BACKING
    live on: the population filter."""
    backing = backing or choose()
    if backing.standin:
        return kernel_dev(os.stat(standin_dir()).st_dev)
    with VM(backing=backing) as vm:
        return vm.create_gmem(abi.PAGE_SIZE, 0).dev


BACKING_ENV = "LUOTRACE_GMEM"  # auto | real | standin: forces the backing (tests, CI)


BACKING_CHOICES = ("auto", "real", "standin")


@dataclass(frozen=True)
class Backing:
    """What a run's guest_memfd files are: "guest_memfd" (real ones) or
    "standin" (StandinFiles); WHY says why stand-ins, or is ''."""
    kind: str
    why: str = ""

    @property
    def standin(self) -> bool:
        return self.kind == "standin"

    @property
    def choice(self) -> str:
        """The --gmem value that gives this backing (passed on to the model)."""
        return "standin" if self.standin else "real"

    def line(self) -> str:
        """The one line every output says it in."""
        if not self.standin:
            return "guest_memfd files: real guest_memfds"
        return f"guest_memfd files: stand-ins (ramfs page-cache files): {self.why}"

    def to_json(self) -> Dict[str, Optional[str]]:
        return {"backing": self.kind, "why": self.why or None}


def choose(choice: Optional[str] = None) -> Backing:
    """The backing of this run's guest_memfd files: CHOICE (--gmem), else
    $LUOTRACE_GMEM, else auto (real where the probe says the host makes them)."""
    source = "--gmem"
    if choice in (None, "auto") and os.environ.get(BACKING_ENV, "auto") != "auto":
        choice, source = os.environ[BACKING_ENV], f"{BACKING_ENV}={os.environ[BACKING_ENV]}"
    choice = choice or "auto"
    if choice not in BACKING_CHOICES:
        raise LuotraceError(f"bad guest_memfd backing {choice!r} ({source})",
                            f"choose one of {', '.join(BACKING_CHOICES)}")
    sup = probe()
    if choice == "standin":
        return Backing("standin", f"forced by {source}" + ("; this host makes guest_memfds too" if sup.ok else
                                                           f"; besides, {sup.why}"))
    if sup.ok:
        return Backing("guest_memfd")
    if choice == "real":
        raise LuotraceError(f"real guest_memfds were asked for ({source}) but {sup.why}",
                            "drop the option to use stand-ins, or run where KVM makes guest_memfds")
    return Backing("standin", sup.why)
