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
- Verified before use: a start adopts a kept set only when the pins are
  exactly the programs and maps its metadata names, each the very object
  kept (kernel ids, which no later object reuses within a boot; types,
  sizes, flags; each program's own map references) and the metadata is this
  build's (its key).  Anything else is dropped and compiled afresh, said in
  one line.  What is kept lives in directories of root's alone (0700,
  tracer/base/private.py), refused when another user's or a symlink.
- One slot is kept (the newest key): a start with another key removes the
  others that no run holds.  A slot is one run's at a time (flock); a second
  run at once compiles its own programs, as before.
- What a slot holds while nothing runs: the programs and maps, ring buffers
  included (bpftool's memlock of the kept maps: 6.5 MiB in light mode, 11.7
  in folio, 15.7 in trace, with the defaults).  ``LUOTRACE_BPF_CACHE=0`` turns
  reuse off; ``rm -r /sys/fs/bpf/luotrace /run/luotrace/bpf-cache`` removes
  what is kept.
- Task local storage cannot be emptied from userspace: the BPF side counts
  what a task keeps only when stamped with this run's number (``luo_run``,
  bpf/luotrace.h), which a reusing start advances before it attaches.

Pinning ABI: include/uapi/linux/bpf.h, BPF_OBJ_PIN (6) and BPF_OBJ_GET (7),
``struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }``;
BPF_OBJ_GET_INFO_BY_FD (15), ``struct { __u32 bpf_fd; __u32 info_len;
__aligned_u64 info; }`` filling ``struct bpf_map_info`` (type, id, key_size,
value_size, max_entries, map_flags: six u32 from offset 0) or ``struct
bpf_prog_info`` (type u32 at 0, id u32 at 4, nr_map_ids u32 at 52, map_ids
u64 at 56).  Map types: the same header's ``enum bpf_map_type``.
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
from typing import Any, Dict, List, Optional, Set

from tracer.kernel import clock
from tracer.kernel import host as kernel
from tracer.base.private import RUN_DIR, Unsafe, private_dir, private_open

PIN_ROOT = "/sys/fs/bpf/luotrace"
META_DIR = os.path.join(RUN_DIR, "bpf-cache")
ENV = "LUOTRACE_BPF_CACHE"

BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
MAP_INFO = struct.Struct("<6I")  # type, id, key_size, value_size, max_entries, map_flags
PROG_INFO_LEN = 80
# enum bpf_map_type
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_HASH = 1, 2, 5, 6, 9
MAP_RINGBUF = 27


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _bpf(cmd: int, path: str, fd: int = 0) -> int:
    name = ct.create_string_buffer(path.encode())
    attr = ct.create_string_buffer(struct.pack("<QII", ct.addressof(name), fd, 0), 16)
    return kernel.bpf(cmd, attr, f"{'OBJ_PIN' if cmd == BPF_OBJ_PIN else 'OBJ_GET'} {path}")


def _info(fd: int, buf) -> None:
    kernel.bpf(BPF_OBJ_GET_INFO_BY_FD, ct.create_string_buffer(struct.pack("<IIQ", fd, len(buf), ct.addressof(buf)), 16),
               "OBJ_GET_INFO_BY_FD")


def map_info(fd: int) -> Dict[str, int]:
    """What the kernel says the map behind FD is."""
    buf = ct.create_string_buffer(MAP_INFO.size + 16)
    _info(fd, buf)
    return dict(zip(("type", "id", "key_size", "value_size", "max_entries", "flags"), MAP_INFO.unpack_from(buf.raw)))


def prog_info(fd: int) -> Dict[str, Any]:
    """What the kernel says the program behind FD is: its type, id and the
    ids of the maps it uses."""
    ids = (ct.c_uint32 * 64)()
    buf = ct.create_string_buffer(PROG_INFO_LEN)
    struct.pack_into("<IQ", buf, 52, 64, ct.addressof(ids))
    _info(fd, buf)
    ptype, pid = struct.unpack_from("<II", buf.raw)
    n = struct.unpack_from("<I", buf.raw, 52)[0]
    return {"type": ptype, "id": pid, "map_ids": sorted(ids[: min(n, 64)])}


def _leaf_size(tab) -> int:
    """The value size the kernel's map must have for TAB's decoding to fit."""
    if tab.ttype in (MAP_PERCPU_HASH, MAP_PERCPU_ARRAY):
        return ct.sizeof(tab.sLeaf)
    return ct.sizeof(tab.Leaf)


class Mismatch(Exception):
    """A kept set that is not what its metadata says."""


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


def _diff(got: Dict[str, Any], want: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {got.get(k)} where {want.get(k)} was kept" for k in sorted(set(got) | set(want))
                     if got.get(k) != want.get(k))[:200]


class Slot:
    """The pinned programs and maps of one key, held by this run from
    claim() to release()."""

    def __init__(self, key: str, lock_fd: int):
        self.key = key
        self.dropped = ""  # why a kept set was dropped instead of adopted
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
            private_dir(META_DIR, top=RUN_DIR)
            fd = private_open(os.path.join(META_DIR, key + ".lock"))
        except Unsafe:
            raise
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
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            meta = None
        funcs: Dict[bytes, Any] = {}
        tables: Dict[str, Any] = {}
        map_fds: List[int] = []
        try:
            self._verify_dirs()
            if not isinstance(meta, dict) or meta.get("key") != self.key:
                raise Mismatch("its metadata is not this build's")
            names = {"f_" + n for n in meta["funcs"]} | {"m_" + t["name"] for t in meta["tables"]}
            if set(os.listdir(self.pins)) != names or len(names) != len(meta["funcs"]) + len(meta["tables"]):
                raise Mismatch("the pins are not the programs and maps its metadata names")
            ids: Set[int] = set()
            for t in meta["tables"]:
                fd = _bpf(BPF_OBJ_GET, os.path.join(self.pins, "m_" + t["name"]))
                map_fds.append(fd)
                got = map_info(fd)
                want = {k: t[k] for k in ("type", "id", "key_size", "value_size", "max_entries", "flags")}
                if got != want:
                    raise Mismatch(f"map {t['name']} is not the one kept ({_diff(got, want)})")
                ids.add(got["id"])
                tab = _table(BPF, fd, t)
                if tab is not None and t["type"] != MAP_RINGBUF and \
                        (ct.sizeof(tab.Key) != got["key_size"] or _leaf_size(tab) != got["value_size"]):
                    raise Mismatch(f"map {t['name']}'s key or value type does not fit the map")
                if tab is not None:
                    tables[t["name"]] = tab
            for name, want in meta["funcs"].items():
                fd = _bpf(BPF_OBJ_GET, os.path.join(self.pins, "f_" + name))
                funcs[name.encode()] = BPF.Function(None, name.encode(), fd)
                prog = prog_info(fd)
                if prog != want or not set(prog["map_ids"]) <= ids:
                    raise Mismatch(f"program {name} is not the one kept ({_diff(prog, want)})")
        except (Mismatch, Unsafe, OSError, KeyError, ValueError, TypeError, AttributeError) as e:
            for fd in [f.fd for f in funcs.values()] + map_fds:
                os.close(fd)
            why = str(e) if isinstance(e, (Mismatch, Unsafe)) else f"it cannot be opened ({type(e).__name__}: {e})"
            self.dropped = f"the programs kept by an earlier start were dropped and compiled afresh: {why}"
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

    def _verify_dirs(self) -> None:
        private_dir(self.pins, top=PIN_ROOT)

    def keep(self, b) -> None:
        """Pin every program B loaded and every map it made, for the next
        start, with what the kernel says each is (verified at adoption)."""
        lib = _lib()
        tables = []
        self.drop()
        private_dir(self.pins, top=PIN_ROOT)
        for i in range(lib.bpf_num_tables(b.module)):
            name = lib.bpf_table_name(b.module, i).decode()
            fd = lib.bpf_table_fd_id(b.module, i)
            _bpf(BPF_OBJ_PIN, os.path.join(self.pins, "m_" + name), fd)
            tables.append(dict(map_info(fd), name=name,
                               key=(lib.bpf_table_key_desc_id(b.module, i) or b"").decode(),
                               leaf=(lib.bpf_table_leaf_desc_id(b.module, i) or b"").decode()))
        funcs = {}
        for name, fn in b.funcs.items():
            n = name.decode() if isinstance(name, bytes) else name
            _bpf(BPF_OBJ_PIN, os.path.join(self.pins, "f_" + n), fn.fd)
            funcs[n] = prog_info(fn.fd)
        tmp = self.meta + ".tmp"
        fd = private_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": self.key, "funcs": funcs, "tables": tables}, f)
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
