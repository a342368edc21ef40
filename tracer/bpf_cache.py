"""Loaded BPF programs kept between starts: a start that changed nothing
since the last one attaches in a fraction of a second instead of compiling.

BCC compiles the C text with clang and LLVM at every start (about a second
here, several under the lane's emulation) and cannot load a compiled object.
The kernel can keep what BCC loaded: programs and maps pinned in the BPF
filesystem stay loaded, attached to nothing, after the process is gone.  The
next start whose program text, flags, BCC and kernel boot are the same opens
them instead of compiling, empties the maps, and attaches them itself.

- Key: sha256 of BCC's version, the kernel release and boot id, the text and
  flags (the text holds every option and layout offset compiled in).
- One slot is kept (the newest key): a start with another key removes the
  others that no run holds.  A slot is one run's at a time (flock); a second
  run at once compiles its own programs, as before.
- What a slot holds while nothing runs: the programs and maps, ring buffers
  included (about 8 MiB of kernel memory in folio mode with the defaults).
  ``LUOTRACE_BPF_CACHE=0`` turns reuse off; ``rm -r /sys/fs/bpf/luotrace``
  removes what is kept.
- Task local storage cannot be emptied from userspace: the BPF side counts
  what a task keeps only when stamped with this run's number (``luo_run``,
  bpf/luotrace.h), which a reusing start advances before it attaches.

Pinning ABI: include/uapi/linux/bpf.h, BPF_OBJ_PIN (6) and BPF_OBJ_GET (7),
``struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }``.
Map types: the same header's ``enum bpf_map_type``.
"""
from __future__ import annotations

import ctypes as ct
import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
from typing import Any, Dict, List, Optional

from . import clock, kernel

PIN_ROOT = "/sys/fs/bpf/luotrace"
META_DIR = "/run/luotrace/bpf-cache"
ENV = "LUOTRACE_BPF_CACHE"

BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
# enum bpf_map_type
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_HASH = 1, 2, 5, 6, 9
MAP_RINGBUF = 27


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _bpf(cmd: int, path: str, fd: int = 0) -> int:
    libc = ct.CDLL(None, use_errno=True)
    name = ct.create_string_buffer(path.encode())
    attr = ct.create_string_buffer(struct.pack("<QII", ct.addressof(name), fd, 0), 16)
    r = libc.syscall(kernel.SYS_BPF_X86_64, cmd, attr, 16)
    if r < 0:
        e = ct.get_errno()
        raise OSError(e, f"bpf({'OBJ_PIN' if cmd == BPF_OBJ_PIN else 'OBJ_GET'}) {path}: {os.strerror(e)}")
    return r


def key(text: str, cflags: List[str]) -> str:
    import bcc
    h = hashlib.sha256()
    for part in (getattr(bcc, "__version__", ""), kernel.release(), clock.boot_id(), text, "\0".join(cflags)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def ensure_bpffs() -> Optional[str]:
    """Mount the BPF filesystem at /sys/fs/bpf if nothing is there (as
    systemd does); None when usable, else why not."""
    base = os.path.dirname(PIN_ROOT)
    if kernel.mounted(base):
        return None
    r = subprocess.run(["mount", "-t", "bpf", "bpf", base], capture_output=True, text=True)
    if r.returncode != 0 and not kernel.mounted(base):
        return f"mount -t bpf bpf {base}: {r.stderr.strip() or 'failed'}"
    return None


def _lib():
    """BCC's table enumeration, which its Python binding does not declare."""
    from bcc.libbcc import lib
    for name, res, args in (("bpf_num_tables", ct.c_ulonglong, [ct.c_void_p]),
                            ("bpf_table_name", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]),
                            ("bpf_table_fd_id", ct.c_int, [ct.c_void_p, ct.c_ulonglong]),
                            ("bpf_table_key_desc_id", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]),
                            ("bpf_table_leaf_desc_id", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _table(BPF, fd: int, t: dict):
    """A BCC table object on a map opened from its pin: BCC builds one from
    the compiled module, which a reusing start has not; its methods only need
    the map's fd, types and size.  None for a map luotrace never reads."""
    from bcc import table as bt
    cls = {MAP_HASH: bt.HashTable, MAP_ARRAY: bt.Array, MAP_PERCPU_HASH: bt.PerCpuHash,
           MAP_PERCPU_ARRAY: bt.PerCpuArray, MAP_LRU_HASH: bt.LruHash, MAP_RINGBUF: bt.RingBuf}.get(t["type"])
    if cls is None:
        return None
    obj = cls.__new__(cls)
    obj.bpf, obj.map_id, obj.map_fd, obj._name, obj._cbs = None, -1, fd, t["name"], {}
    obj.Key = BPF._decode_table_type(json.loads(t["key"]))
    obj.Leaf = BPF._decode_table_type(json.loads(t["leaf"]))
    obj.ttype, obj.flags, obj.max_entries = t["type"], t["flags"], t["max_entries"]
    if t["type"] in (MAP_PERCPU_HASH, MAP_PERCPU_ARRAY):  # as BCC's PerCpu* constructors do
        obj.reducer, obj.sLeaf, obj.total_cpu = None, obj.Leaf, len(bt.get_possible_cpus())
        obj.alignment = ct.sizeof(obj.sLeaf) % 8
        obj.Leaf = obj.sLeaf * obj.total_cpu if obj.alignment == 0 else ct.c_uint64 * obj.total_cpu
    if t["type"] == MAP_RINGBUF:
        obj._ringbuf, obj._event_class = None, None
    return obj


def _empty(tab) -> None:
    """A map as a fresh load has it: hashes without entries, arrays zero."""
    if tab.ttype in (MAP_ARRAY, MAP_PERCPU_ARRAY):
        zero = tab.Leaf()
        for i in range(tab.max_entries):
            tab[tab.Key(i)] = zero
    elif tab.ttype in (MAP_HASH, MAP_PERCPU_HASH, MAP_LRU_HASH):
        while True:
            keys = list(tab.keys())
            if not keys:
                return
            for k in keys:
                try:
                    del tab[k]
                except KeyError:
                    pass


class Slot:
    """The pinned programs and maps of one key, held by this run from
    claim() to release()."""

    def __init__(self, key: str, lock_fd: int):
        self.key = key
        self._lock = lock_fd
        self.pins = os.path.join(PIN_ROOT, key)
        self.meta = os.path.join(META_DIR, key + ".json")

    @classmethod
    def claim(cls, key: str) -> Optional["Slot"]:
        """The slot for KEY, locked for this run; None if reuse is off, the
        BPF filesystem is not usable, or another run holds it."""
        if not enabled() or ensure_bpffs():
            return None
        try:
            os.makedirs(META_DIR, exist_ok=True)
            fd = os.open(os.path.join(META_DIR, key + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(key, fd)

    def release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def drop(self) -> None:
        """Forget what this slot kept (a broken or partial one)."""
        shutil.rmtree(self.pins, ignore_errors=True)
        try:
            os.unlink(self.meta)
        except OSError:
            pass

    def adopt(self, BPF) -> Optional[Any]:
        """A BPF object on the programs and maps kept under this key, its maps
        emptied and the run number advanced, the programs BCC attaches while
        loading (fentry, tracepoints) attached; None if nothing usable is kept."""
        try:
            with open(self.meta) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        funcs: Dict[bytes, Any] = {}
        tables: Dict[str, Any] = {}
        map_fds: List[int] = []
        try:
            for name in meta["funcs"]:
                fd = _bpf(BPF_OBJ_GET, os.path.join(self.pins, "f_" + name))
                funcs[name.encode()] = BPF.Function(None, name.encode(), fd)
            for t in meta["tables"]:
                fd = _bpf(BPF_OBJ_GET, os.path.join(self.pins, "m_" + t["name"]))
                map_fds.append(fd)
                tab = _table(BPF, fd, t)
                if tab is not None:
                    tables[t["name"]] = tab
        except (OSError, KeyError, ValueError, TypeError):
            for fd in [f.fd for f in funcs.values()] + map_fds:
                os.close(fd)
            self.drop()
            return None
        b = _adopted_class(BPF)(funcs, tables, map_fds)
        for f in funcs.values():
            f.bpf = b
        try:
            run = tables.get("luo_run")
            last = run[run.Key(0)].value if run is not None else 0
            for tab in tables.values():
                _empty(tab)
            if run is not None:
                run[run.Key(0)] = run.Leaf(last + 1)
            b.stats_base = {n: kernel.prog_stats(f.fd) for n, f in funcs.items()}
            for name in meta["funcs"]:  # what BPF() attaches while loading (its _trace_autoload)
                if name.startswith("kfunc__"):
                    b.attach_kfunc(fn_name=name)
                elif name.startswith("kretfunc__"):
                    b.attach_kretfunc(fn_name=name)
                elif name.startswith("tracepoint__"):
                    b.attach_tracepoint(tp=name[len("tracepoint__"):].replace("__", ":"), fn_name=name)
        except BaseException:
            b.cleanup()  # detaches what attached, closes every fd: as a BPF() that failed to load
            raise
        return b

    def keep(self, b) -> None:
        """Pin every program B loaded and every map it made, for the next start."""
        lib = _lib()
        tables = []
        self.drop()
        os.makedirs(self.pins, exist_ok=True)
        for i in range(lib.bpf_num_tables(b.module)):
            name = lib.bpf_table_name(b.module, i).decode()
            _bpf(BPF_OBJ_PIN, os.path.join(self.pins, "m_" + name), lib.bpf_table_fd_id(b.module, i))
            tables.append({"name": name, "type": lib.bpf_table_type_id(b.module, i),
                           "flags": lib.bpf_table_flags_id(b.module, i),
                           "max_entries": int(lib.bpf_table_max_entries_id(b.module, i)),
                           "key": (lib.bpf_table_key_desc_id(b.module, i) or b"").decode(),
                           "leaf": (lib.bpf_table_leaf_desc_id(b.module, i) or b"").decode()})
        funcs = []
        for name, fn in b.funcs.items():
            n = name.decode() if isinstance(name, bytes) else name
            _bpf(BPF_OBJ_PIN, os.path.join(self.pins, "f_" + n), fn.fd)
            funcs.append(n)
        tmp = self.meta + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"funcs": funcs, "tables": tables}, f)
        os.replace(tmp, self.meta)  # written last: a slot without it is never adopted
        self._prune()

    def _prune(self) -> None:
        """Remove the slots of other keys that no run holds."""
        names = set()
        for d, strip in ((PIN_ROOT, ""), (META_DIR, ".lock")):
            try:
                names |= {n[: -len(strip)] if strip else n for n in os.listdir(d) if n.endswith(strip)}
            except OSError:
                pass
        for k in names:
            if k == self.key:
                continue
            other = Slot.claim(k)
            if other is not None:
                other.drop()
                other.release()
                try:
                    os.unlink(os.path.join(META_DIR, k + ".lock"))
                except OSError:
                    pass


def _adopted_class(BPF):
    class Adopted(BPF):
        """bcc.BPF on programs and maps opened from their pins: nothing
        compiled (no module); the attach and detach methods are BCC's."""

        def __init__(self, funcs: Dict[bytes, Any], tables: Dict[str, Any], map_fds: List[int]):
            # what BPF.__init__ sets up, without compiling
            for name in ("kprobe_fds", "uprobe_fds", "tracepoint_fds", "raw_tracepoint_fds", "kfunc_entry_fds",
                         "kfunc_exit_fds", "lsm_fds", "perf_buffers", "open_perf_events"):
                setattr(self, name, {})
            self._ringbuf_manager, self.tracefile, self.debug = None, None, 0
            self.funcs, self.tables, self.module = funcs, tables, None
            self._map_fds = map_fds
            self.stats_base: Dict[bytes, Dict[str, int]] = {}

        def load_func(self, func_name, prog_type, device=None, attach_type=-1):
            name = func_name if isinstance(func_name, bytes) else func_name.encode()
            if name not in self.funcs:
                raise Exception(f"Unknown program {name.decode()}")
            return self.funcs[name]

        def get_table(self, name, keytype=None, leaftype=None, reducer=None):
            n = name.decode() if isinstance(name, bytes) else name
            if n not in self.tables:
                raise KeyError(n)
            return self.tables[n]

        def __getitem__(self, key):
            return self.get_table(key)

        def close(self):
            super().close()
            for fd in self._map_fds:
                try:
                    os.close(fd)
                except OSError as e:
                    if e.errno != errno.EBADF:
                        raise
            self._map_fds = []

    return Adopted
