"""A BPF ring buffer read straight from its memory mapping, a block of
records at a time.

BCC (and libbpf under it) hands each record to a callback: through ctypes
that is a Python call per event, a few microseconds each, which caps a live
trace-mode run well below a million events a second.  Every luotrace record
has the same size, so the records between the consumer and the producer
positions sit at a fixed stride and numpy can take them in one go.

Layout and protocol: kernel/bpf/ringbuf.c (Linux 5.8+), as libbpf's
ringbuf.c reads it.  Page 0 holds consumer_pos (mapped read-write), page 1
producer_pos, then the data area mapped twice in a row, so a run of records
that wraps around the end is still contiguous.  Each record is an 8-byte
header (u32 length with BUSY and DISCARD flag bits, u32 page offset) and its
data, rounded up to 8 bytes.
"""
from __future__ import annotations

import mmap
import select
import time
from typing import Optional

import numpy as np

# While records flow, the consumer sleeps this long between drains instead of
# waiting for the kernel to wake it: a wakeup (and the producer's irq_work
# behind it, an IPI that a paravirtual host charges a VM exit for) per batch,
# not per record.  Latency stays bounded by it; when nothing came, the consumer
# waits on epoll and the first record wakes it.
BATCH_S = 0.002

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
PAGE = mmap.PAGESIZE


def wait(ep: Optional[select.epoll], got: bool, timeout_s: float) -> None:
    """Between two drains: a batch's time while records flow (GOT), else
    until the kernel says one came (or TIMEOUT_S)."""
    if got:
        if BATCH_S > 0:
            time.sleep(min(BATCH_S, timeout_s))
    elif ep is not None:
        ep.poll(timeout_s)


class RingReader:
    """Consumer of one BPF_MAP_TYPE_RINGBUF whose records are all ``record_size`` bytes."""

    def __init__(self, map_fd: int, data_size: int, record_size: int):
        if data_size <= 0 or data_size & (data_size - 1) or data_size % PAGE:
            raise ValueError(f"ring buffer size {data_size} is not a power-of-two number of pages")
        self.fd = map_fd
        self.size = data_size
        self.mask = data_size - 1
        self.record = record_size
        self.stride = (record_size + HDR_SIZE + 7) & ~7
        self._cons_map = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data_map = mmap.mmap(map_fd, PAGE + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        self._cons = np.frombuffer(self._cons_map, dtype=np.uint64, count=1)
        self._prod = np.frombuffer(self._data_map, dtype=np.uint64, count=1)
        self._data = np.frombuffer(self._data_map, dtype=np.uint8, offset=PAGE)
        self._rec_dtype = np.dtype([("len", "<u4"), ("pg_off", "<u4"), ("body", "V%d" % (self.stride - HDR_SIZE))])

    def consume(self) -> Optional[bytes]:
        """Every committed record now in the buffer, as one block of raw
        records (``record_size`` each); None when there is none.  Frees the
        space in the ring for the producer."""
        out = []
        # One look at the producer: what is committed up to here is this call's, what it writes
        # meanwhile the next call's.  Chasing it instead (a fresh look each time round) took a few
        # records a turn at a few microseconds of numpy each while a writer kept pace: 350,000
        # turns for a million records in the ingest benchmark, most of the consumer's time.
        prod = int(self._prod[0])  # x86 and arm64 loads of an aligned u64 are atomic
        while True:
            cons = int(self._cons[0])
            if prod <= cons:
                break
            start = cons & self.mask
            n = (prod - cons) // self.stride
            recs = self._data[start: start + n * self.stride].view(self._rec_dtype)
            lens = recs["len"]
            ok = lens == self.record
            k = n if ok.all() else int(np.argmin(ok))
            if k:
                body = recs["body"][:k]
                out.append(np.ascontiguousarray(body).view(np.uint8).reshape(k, -1)[:, : self.record].tobytes())
                self._cons[0] = cons + k * self.stride
                continue
            # the first record is not a plain committed one of our size
            hdr = int(lens[0]) if n else int(self._data[start: start + 4].view("<u4")[0])
            if hdr & BUSY_BIT:
                break  # still being written: the next call takes it
            length = hdr & ~(BUSY_BIT | DISCARD_BIT)
            # discarded, or a size we do not read: step over it
            self._cons[0] = cons + ((length + HDR_SIZE + 7) & ~7)
        return b"".join(out) if out else None

    def skip(self) -> None:
        """Drop every record now in the buffer unread."""
        self._cons[0] = self._prod[0]

    def close(self) -> None:
        for name in ("_cons", "_prod", "_data"):
            setattr(self, name, None)
        self._cons_map.close()
        self._data_map.close()
