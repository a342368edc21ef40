"""The recording file: a versioned header, then framed chunks of raw event
records as they arrived, then the final BPF map dumps and a trailer.

Layout (all little endian), version 2::

    "LUOTRACE" u16 version u16 0 u32 header_len  u32 header_crc  header (JSON)
    chunk*:  u32 type  u32 length  u32 crc  payload
        1 EVENTS  length/64 raw struct luo_event records (a block: 256 KiB or 1 s)
        2 MAPS    JSON map dumps (folio counters, histograms, population, counters);
                  also written during the run (a second after lifecycle activity,
                  when a kexec starts, and before a long-running serve deletes
                  the rows of files it retires); per file, the last row wins
        3 END     JSON trailer (duration, BPF run time); its presence = closed cleanly

A file cut short (SIGKILL, full disk) still reads: every whole record before
the cut is recovered and the result says it was truncated.  Every chunk
carries a CRC32C of its type, length and payload (version 1 had none, and
still reads): a chunk that fails it is reported and skipped, never trusted.
Every JSON part is checked against its schema (tracer/schemas/) before use.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, List, Optional, Tuple

import numpy as np
from crc32c import crc32c

from tracer import schemas
from tracer.base.errors import LuotraceError
from tracer.base.output import open_output
from tracer.probes.events import EVENT_DTYPE, EVENT_SIZE

MAGIC = b"LUOTRACE"
VERSION = 2
PREAMBLE = struct.Struct("<8sHHI")
HEADER_CRC = struct.Struct("<I")  # version 2: after the preamble
CHUNK = struct.Struct("<III")  # version 2: type, length, crc
CHUNK_V1 = struct.Struct("<II")
CHUNK_NAMES = {1: "event chunk", 2: "map dump", 3: "trailer"}
CH_EVENTS, CH_MAPS, CH_END = 1, 2, 3
MAX_HEADER = 16 << 20
FLUSH_BYTES = 256 << 10
FLUSH_SECONDS = 1.0  # a crash loses at most this much of a quiet stream


def frame(kind: int, payload: bytes) -> bytes:
    """One chunk as written: its header (with the CRC32C of type, length
    and payload) and the payload."""
    head = CHUNK_V1.pack(kind, len(payload))
    return CHUNK.pack(kind, len(payload), crc32c(payload, crc32c(head))) + payload


def preamble(header_blob: bytes) -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION, 0, len(header_blob)) + HEADER_CRC.pack(crc32c(header_blob)) + header_blob


class Writer:
    """Appends chunks; events are buffered and flushed in blocks.  Any OSError
    from a write is the caller's to handle (a live run stops recording and
    goes on, see LiveRun)."""

    def __init__(self, path: str, header: dict, force: bool = False):
        self.path = path
        self._f: BinaryIO = open_output(path, force, "recording")
        self._f.write(preamble(json.dumps(header, sort_keys=True).encode()))
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
            self._f.write(frame(CH_EVENTS, payload))
            self.records += len(payload) // EVENT_SIZE
            self._buf, self._buffered = [], 0
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())

    def _json_chunk(self, kind: int, obj: dict) -> None:
        self._f.write(frame(kind, json.dumps(obj, sort_keys=True).encode()))

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
    damaged: List[str] = field(default_factory=list)  # chunks skipped: their checksum failed
    damaged_records: int = 0  # event records in those chunks
    _events: Optional[np.ndarray] = field(default=None, repr=False)
    _mem: Optional[mmap.mmap] = field(default=None, repr=False)  # the file, when mapped
    _spans: List[Tuple[int, int]] = field(default_factory=list, repr=False)  # each chunk's bytes in it
    # each map dump: (event records before it, its bytes in the file): played back in time by
    # tracer/analysis/player.py, decoded only then
    dump_spans: List[Tuple[int, int, int]] = field(default_factory=list, repr=False)
    _data: object = field(default=None, repr=False)

    def dump(self, i: int) -> dict:
        """The I-th map dump as written (not merged with the earlier ones)."""
        _records, start, stop = self.dump_spans[i]
        return _json(memoryview(self._data)[start:stop], "<recording>", "map dump")  # type: ignore[arg-type]

    @property
    def events(self) -> np.ndarray:
        """All records as one array (a copy: replay itself walks ``batches``)."""
        if self._events is None:
            self._events = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=EVENT_DTYPE)
        return self._events

    def batches(self) -> Iterator[np.ndarray]:
        """Each chunk's records in turn.  A mapped file's pages are let go
        once the consumer has moved past them (they load again if touched),
        so walking a recording of any size keeps memory flat."""
        mapped = self._mem is not None and len(self._spans) == len(self.chunks)
        for i, chunk in enumerate(self.chunks):
            if mapped:
                _populate(self._mem, *self._spans[i])
            yield chunk
            if mapped:
                _release(self._mem, *self._spans[i])


# Per-file tables of a map dump and the fields that key a row.
ROW_KEYS = {"folio_stats": ("handler", "dev", "ino"), "population": ("handler", "dev", "ino"),
            "folio_hist": ("handler", "dev", "ino", "slot")}


def newer_maps(old: Optional[dict], new: dict) -> dict:
    """Two map dumps as one: NEW's counters, and per file NEW's row or, for a
    file NEW no longer holds (a serve retired it and deleted its rows), OLD's
    last one.  Rows are never deleted otherwise, so for any other recording
    this is NEW itself."""
    if not old:
        return new
    out = dict(new)
    for table, keys in ROW_KEYS.items():
        if not old.get(table):
            continue
        rows = {tuple(r.get(k) for k in keys): r for r in old[table]}
        rows.update((tuple(r.get(k) for k in keys), r) for r in new.get(table, []))
        out[table] = list(rows.values())
    return out


def _bad(path: str, what: str) -> LuotraceError:
    return LuotraceError(f"{path}: {what}", "pass a file written by `luotrace record`")


def read(path: str) -> Recording:
    """Map the file (no copy: records are decoded in place, pages load as the
    replay walks them) and parse it."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise _bad(path, "is a directory") from None
    except OSError as e:
        raise LuotraceError(f"cannot read {path}: {e.strerror}", "check the path") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _bad(path, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise _bad(path, "is not a regular file (a FIFO, socket or device)")
        data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else b""
    except OSError as e:
        raise LuotraceError(f"cannot read {path}: {e.strerror}", "check the path") from None
    finally:
        os.close(fd)
    return parse(data, path)


def walk(data) -> Iterator[Tuple[int, int, int, int]]:
    """(type, offset, payload offset, length) of each whole chunk, unchecked:
    the file's layout, for tools and tests that rewrite recordings."""
    _m, version, _r, hlen = PREAMBLE.unpack_from(data, 0)
    chunk = CHUNK if version >= 2 else CHUNK_V1
    pos = PREAMBLE.size + (HEADER_CRC.size if version >= 2 else 0) + hlen
    while pos + chunk.size <= len(data):
        kind, length = chunk.unpack_from(data, pos)[:2]
        yield kind, pos, pos + chunk.size, length
        pos += chunk.size + length


def header_end(data) -> int:
    """Offset of the first chunk (the end of the preamble and header)."""
    _m, version, _r, hlen = PREAMBLE.unpack_from(data, 0)
    return PREAMBLE.size + (HEADER_CRC.size if version >= 2 else 0) + hlen


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number luotrace writes")


def _json(blob, path: str, what: str) -> dict:
    """A JSON part, parsed and checked against its schema: one-line errors
    for anything luotrace would not have written (NaN, infinities, deep
    nesting, wrong types, numbers out of range)."""
    try:
        obj = json.loads(bytes(blob), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad(path, f"{what} is corrupt (not JSON)") from None
    problem = schemas.problem(what, obj)
    if problem:
        raise _bad(path, f"{what} is corrupt ({problem})")
    return obj


def _crc_ok(data, pos: int, end: int, release: bool = False) -> bool:
    """The chunk at POS checks out.  With RELEASE, a mapped file's pages just
    read are let go (a recording of any size is checked in flat memory)."""
    kind, length, crc = CHUNK.unpack_from(data, pos)
    ok = crc32c(memoryview(data)[pos + CHUNK.size: end], crc32c(CHUNK_V1.pack(kind, length))) == crc
    if release:
        _release(data, pos, end)
    return ok


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.11 lacks the name


def _populate(data, start: int, stop: int) -> None:
    """Map [START, STOP) in one call rather than a fault per few pages."""
    first = start - start % mmap.PAGESIZE
    try:
        data.madvise(MADV_POPULATE_READ, first, stop - first)
    except (OSError, ValueError):
        pass  # an older kernel: the pages fault in as read


def _release(data, start: int, stop: int) -> None:
    """Drop the pages of [START, STOP) from a mapping (they load again if touched)."""
    if isinstance(data, mmap.mmap) and stop > start:
        first = start - start % mmap.PAGESIZE
        try:
            data.madvise(mmap.MADV_DONTNEED, first, stop - first)
        except (OSError, ValueError):
            pass  # only a hint


def _sound_chunk_at(data, pos: int) -> bool:
    """A whole chunk with a good checksum starts at POS (or the file ends
    there): how a damaged chunk's length is trusted enough to skip it."""
    if pos == len(data):
        return True
    if pos + CHUNK.size > len(data):
        return False
    kind, length, _crc = CHUNK.unpack_from(data, pos)
    return kind in CHUNK_NAMES and pos + CHUNK.size + length <= len(data) and \
        _crc_ok(data, pos, pos + CHUNK.size + length)


_JSON_CHUNK = re.compile(rb"[\x02\x03]\x00\x00\x00.{8}\{", re.DOTALL)


def _length_overruns(data, start: int, version: int) -> bool:
    """A chunk that runs past the end of the file is a write cut short, whose
    whole records are worth keeping, unless a sound map dump or trailer
    starts inside it: then its length field is damaged, and what follows it
    is not events."""
    if version < 2:
        return False
    for m in _JSON_CHUNK.finditer(data, start):
        if _sound_chunk_at(data, m.start()):
            return True
    return False


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
    hstart = PREAMBLE.size + (HEADER_CRC.size if version >= 2 else 0)
    if hlen > MAX_HEADER or hstart + hlen > len(data):
        raise _bad(path, "header cut short or corrupt")
    hblob = view[hstart: hstart + hlen]
    if version >= 2 and crc32c(hblob) != HEADER_CRC.unpack_from(data, PREAMBLE.size)[0]:
        raise _bad(path, "header is corrupt (checksum failed)")
    header = _json(hblob, path, "header")
    chunk = CHUNK if version >= 2 else CHUNK_V1
    pos = hstart + hlen
    rec = Recording(header, [], _mem=data if isinstance(data, mmap.mmap) else None, _data=data)
    nrec = 0
    while pos < len(data):
        if pos + chunk.size > len(data):
            rec.truncated, rec.truncated_reason = True, f"cut inside a chunk header at byte {pos}"
            break
        kind, length = chunk.unpack_from(data, pos)[:2]
        start, stop = pos + chunk.size, pos + chunk.size + length
        body = view[start: stop]
        short = len(body) < length
        name = CHUNK_NAMES.get(kind, f"chunk of type {kind}")
        if short and _length_overruns(data, start, version):
            rec.damaged.append(f"byte {pos} onwards (a chunk's length runs past the end of the file)")
            rec.truncated, rec.truncated_reason = True, f"unreadable from byte {pos} (a chunk's length runs past the end)"
            break
        if version >= 2 and not short and not _crc_ok(data, pos, stop, release=True):
            if not _sound_chunk_at(data, stop):
                rec.damaged.append(f"byte {pos} onwards (a chunk failed its checksum and its length cannot "
                                   f"be trusted)")
                rec.truncated, rec.truncated_reason = True, f"unreadable from byte {pos} (checksum failed)"
                break
            records = length // EVENT_SIZE if kind == CH_EVENTS else 0
            rec.damaged.append(f"{name} at byte {pos}" + (f" ({records} records)" if records else ""))
            rec.damaged_records += records
            pos = stop
            continue
        if kind == CH_EVENTS:
            if length % EVENT_SIZE and not short:
                raise _bad(path, f"corrupt event chunk at byte {pos} (length {length} is not whole records)")
            n = len(body) // EVENT_SIZE
            if n:
                rec.chunks.append(np.frombuffer(body, dtype=EVENT_DTYPE, count=n))
                nrec += n
                rec._spans.append((start, start + n * EVENT_SIZE))
            if short:
                rec.truncated, rec.truncated_reason = True, f"cut inside an event chunk at byte {len(data)}"
                break
        elif kind in (CH_MAPS, CH_END):
            if short:
                rec.truncated, rec.truncated_reason = True, f"cut inside the {name}"
                break
            obj = _json(body, path, name)
            if kind == CH_MAPS:
                rec.maps = newer_maps(rec.maps, obj)
                rec.dump_spans.append((nrec, start, stop))
            else:
                rec.end = obj
        else:
            raise _bad(path, f"corrupt chunk type {kind} at byte {pos}")
        pos = stop
    if rec.end is None and not rec.truncated:
        rec.truncated, rec.truncated_reason = True, "no trailer: the recording was not closed (killed or still being written)"
    return rec
