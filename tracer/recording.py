"""The recording file: a versioned header, then framed chunks of raw event
records as they arrived, then the final BPF map dumps and a trailer.

Layout (all little endian)::

    "LUOTRACE" u16 version u16 0 u32 header_len  header (JSON, header_len bytes)
    chunk*:  u32 type  u32 length  payload
        1 EVENTS  length/64 raw struct luo_event records (a block: 256 KiB or 1 s)
        2 MAPS    JSON map dumps (folio counters, histograms, population, counters);
                  also written during the run (a second after lifecycle activity,
                  and when a kexec starts); the last one wins
        3 END     JSON trailer (duration, BPF run time); its presence = closed cleanly

A file cut short (SIGKILL, full disk) still reads: every whole record before
the cut is recovered and the result says it was truncated.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, List, Optional

import numpy as np

from .errors import LuotraceError
from .events import EVENT_DTYPE, EVENT_SIZE

MAGIC = b"LUOTRACE"
VERSION = 1
PREAMBLE = struct.Struct("<8sHHI")
CHUNK = struct.Struct("<II")
CH_EVENTS, CH_MAPS, CH_END = 1, 2, 3
MAX_HEADER = 16 << 20
FLUSH_BYTES = 256 << 10
FLUSH_SECONDS = 1.0  # a crash loses at most this much of a quiet stream


def check_output(path: str, force: bool = False, what: str = "output") -> None:
    """Refuse, before any work, an output luotrace must not write: anything
    but a regular file (a device, FIFO or directory), or an existing file
    without FORCE."""
    try:
        st: Optional[os.stat_result] = os.stat(path)
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


class Writer:
    """Appends chunks; events are buffered and flushed in blocks.  Any OSError
    from a write is the caller's to handle (a live run stops recording and
    goes on, see LiveSession)."""

    def __init__(self, path: str, header: dict, force: bool = False):
        self.path = path
        self._f: BinaryIO = open_output(path, force, "recording")
        blob = json.dumps(header, sort_keys=True).encode()
        self._f.write(PREAMBLE.pack(MAGIC, VERSION, 0, len(blob)) + blob)
        self._buf: List[bytes] = []
        self._buffered = 0
        self.records = 0
        self._last_flush = time.monotonic()
        self._f.flush()

    def add(self, raw: bytes) -> None:
        self._buf.append(raw)
        self._buffered += len(raw)
        if self._buffered >= FLUSH_BYTES:
            self.flush()

    def maybe_flush(self) -> None:
        """Flush a block that has waited FLUSH_SECONDS, however small."""
        if self._buf and time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self, sync: bool = False) -> None:
        self._last_flush = time.monotonic()
        if self._buf:
            payload = b"".join(self._buf)
            payload = payload[: len(payload) - len(payload) % EVENT_SIZE]
            self._f.write(CHUNK.pack(CH_EVENTS, len(payload)) + payload)
            self.records += len(payload) // EVENT_SIZE
            self._buf, self._buffered = [], 0
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())

    def _json_chunk(self, kind: int, obj: dict) -> None:
        blob = json.dumps(obj, sort_keys=True).encode()
        self._f.write(CHUNK.pack(kind, len(blob)) + blob)

    def write_maps(self, maps: dict, sync: bool = False) -> None:
        """A map dump now (the last one in a file wins): written while a run
        goes on, so that a run cut short (a kexec, a crash) keeps the per-file
        folio counters held in BPF maps."""
        self.flush()
        self._json_chunk(CH_MAPS, maps)
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())

    def close(self, maps: dict, end: dict) -> None:
        self.write_maps(maps)
        self._json_chunk(CH_END, end)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abandon(self) -> None:
        """Stop writing after a write error: what reached the file stays (it
        reads as truncated), the rest is dropped, nothing more is tried."""
        self._buf, self._buffered = [], 0
        try:
            self._f.close()
        except OSError:
            pass


@dataclass
class Recording:
    header: dict
    chunks: List[np.ndarray]
    maps: Optional[dict] = None
    end: Optional[dict] = None
    truncated: bool = False
    truncated_reason: str = ""
    _events: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def events(self) -> np.ndarray:
        """All records as one array (a copy: replay itself walks ``batches``)."""
        if self._events is None:
            self._events = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=EVENT_DTYPE)
        return self._events

    def batches(self) -> Iterator[np.ndarray]:
        yield from self.chunks


def _bad(path: str, what: str) -> LuotraceError:
    return LuotraceError(f"{path}: {what}", "pass a file written by `luotrace record`")


def read(path: str) -> Recording:
    """Map the file (no copy: records are decoded in place, pages load as the
    replay walks them) and parse it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except IsADirectoryError:
        raise _bad(path, "is a directory") from None
    except OSError as e:
        raise LuotraceError(f"cannot read {path}: {e.strerror}", "check the path") from None
    return parse(data, path)


def parse(data, path: str = "<recording>") -> Recording:
    """Decode a recording held in memory (bytes or a mapping); see the module
    docstring for the layout.  Event records are numpy views, not copies."""
    view = memoryview(data)
    if len(data) < PREAMBLE.size or bytes(view[: len(MAGIC)]) != MAGIC:
        raise _bad(path, "not a luotrace recording (no LUOTRACE header)")
    _magic, version, _r, hlen = PREAMBLE.unpack_from(data, 0)
    if version > VERSION:
        raise LuotraceError(f"{path}: recording format version {version} is newer than this luotrace reads "
                            f"({VERSION})", "upgrade luotrace")
    if version < 1:
        raise _bad(path, f"unknown recording format version {version}")
    if hlen > MAX_HEADER or PREAMBLE.size + hlen > len(data):
        raise _bad(path, "header cut short or corrupt")
    try:
        header = json.loads(bytes(view[PREAMBLE.size: PREAMBLE.size + hlen]))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError):
        raise _bad(path, "header is corrupt (not JSON)") from None
    pos = PREAMBLE.size + hlen
    chunks: List[np.ndarray] = []
    maps = end = None
    truncated, reason = False, ""
    while pos < len(data):
        if pos + CHUNK.size > len(data):
            truncated, reason = True, f"cut inside a chunk header at byte {pos}"
            break
        kind, length = CHUNK.unpack_from(data, pos)
        body = view[pos + CHUNK.size: pos + CHUNK.size + length]
        short = len(body) < length
        if kind == CH_EVENTS:
            if length % EVENT_SIZE and not short:
                raise _bad(path, f"corrupt event chunk at byte {pos} (length {length} is not whole records)")
            n = len(body) // EVENT_SIZE
            if n:
                chunks.append(np.frombuffer(body, dtype=EVENT_DTYPE, count=n))
            if short:
                truncated, reason = True, f"cut inside an event chunk at byte {len(data)}"
                break
        elif kind in (CH_MAPS, CH_END):
            if short:
                truncated, reason = True, f"cut inside the {'map dump' if kind == CH_MAPS else 'trailer'}"
                break
            try:
                obj = json.loads(bytes(body))
                if not isinstance(obj, dict):
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                raise _bad(path, f"corrupt {'map dump' if kind == CH_MAPS else 'trailer'} at byte {pos}") from None
            if kind == CH_MAPS:
                maps = obj
            else:
                end = obj
        else:
            raise _bad(path, f"corrupt chunk type {kind} at byte {pos}")
        pos += CHUNK.size + length
    if end is None and not truncated:
        truncated, reason = True, "no trailer: the recording was not closed (killed or still being written)"
    return Recording(header, chunks, maps, end, truncated, reason)
