"""KVM and guest_memfd through their ioctls (numbers and structs in
kvm_abi.py): a VM, its guest_memfds, fallocate on them.  The tracer needs it
to learn the guest_memfd superblock's dev_t (the population probes' filter)
and `doctor` to check KVM; the workload drivers build on it.

Files are created the way a VMM preparing for a live update would
(``KVM_CREATE_GUEST_MEMFD`` with MMAP | INIT_SHARED, pre-allocated with
``fallocate(FALLOC_FL_KEEP_SIZE)``: mode 0 is refused), so the kernel's filemap
tracepoints see one real folio per 4 KiB page.

Not every host's KVM makes guest_memfds (no /dev/kvm, a paravirtual KVM,
a kernel before the MMAP flag).  ``probe`` asks once and says why not;
``choose`` then picks the backing of a run's guest_memfd files: real ones, or
stand-ins (``StandinFile``, a ramfs page-cache file filled through faults)
that every output names as such.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional

from tracer.kernel import kvm_abi as abi
from tracer.base.errors import LuotraceError
from tracer.base.private import private_dir, private_open

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

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


_ZEROS = bytes(16 << 20)


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
        with mmap.mmap(self.fd, length, offset=offset) as m:
            for at in range(0, length, len(_ZEROS)):
                n = min(len(_ZEROS), length - at)
                m[at:at + n] = _ZEROS[:n]

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
            if _libc.mount(b"luotrace-gmem-standin", abi.STANDIN_DIR.encode(), b"ramfs",
                           0x2 | 0x4 | 0x8, b"mode=0700") != 0:  # MS_NOSUID | MS_NODEV | MS_NOEXEC
                err = ctypes.get_errno()
                raise GmemError(err, f"mounting the guest_memfd stand-in ramfs on {abi.STANDIN_DIR}: "
                                     f"{os.strerror(err)}")
    return abi.STANDIN_DIR


def _statfs_type(path: str) -> int:
    """statfs(2)'s f_type (os.statvfs does not give it)."""
    buf = ctypes.create_string_buffer(120)  # struct statfs, x86_64: f_type is its first word
    if _libc.statfs(path.encode(), buf) != 0:
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


# ---- can this host make guest_memfds, and what a run uses instead ----

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
