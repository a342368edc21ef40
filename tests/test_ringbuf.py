"""luotrace reads its BPF ring buffers itself (tracer/attach/ringbuf.py).  Here a real
ring buffer in the running kernel, made tiny (one page: 56 records) so that it
wraps around many times, is fed by a real BPF program on the page-cache
tracepoint while a real guest_memfd is populated (the harness of
tests/bench_ingest.py): every record arrives once, in order, intact, and what
does not fit is counted as lost, exactly."""
from __future__ import annotations

import select

import numpy as np
import pytest

from tracer.probes import catalog
from tracer.probes.events import EVENT_SIZE, decode
from tracer.kernel.backing import VM

from .bench_ingest import folio_lost, load_harness

PAGE = 4096


@pytest.fixture
def tiny_ring(gmem):
    b, ring = load_harness(1)
    yield b, ring
    ring.close()
    b.cleanup()


def test_records_wrap_around_a_tiny_ring_in_order_and_intact(tiny_ring):
    b, ring = tiny_ring
    assert ring.stride == 72 and PAGE // ring.stride == 56
    got = []
    with VM() as vm:
        f = vm.create_gmem(40 * PAGE)
        for _ in range(100):  # 100 x 40 folios through a 56-record ring: it wraps ~70 times
            f.populate()
            raw = ring.consume()
            assert raw is not None and len(raw) % EVENT_SIZE == 0
            got.append(decode(raw))
            f.punch(0, f.size)
        ino = f.ino
    assert ring.consume() is None
    ev = np.concatenate(got)
    assert folio_lost(b) == 0
    assert len(ev) == 4000
    assert (ev["ino"] == ino).all() and (ev["probe"] == catalog.PROBE_IDS["kho_preserve_folio"]).all()
    assert (ev["a1"] == np.tile(np.arange(40), 100)).all()  # folio indexes, in order, every round
    assert (np.diff(ev["ts"].astype(np.int64)) >= 0).all()


def test_a_burst_larger_than_the_ring_is_counted_as_lost_exactly(tiny_ring):
    b, ring = tiny_ring
    with VM() as vm:
        f = vm.create_gmem(1024 * PAGE)
        f.populate()  # 1024 folios at once into 56 slots, nobody reading
        raw = ring.consume()
    n = len(raw) // EVENT_SIZE
    assert n == 56  # the ring was full
    assert n + folio_lost(b) == 1024
    assert (decode(raw)["a1"] == np.arange(56)).all()  # the first ones made it


def test_the_ring_wakes_epoll(tiny_ring):
    b, ring = tiny_ring
    ep = select.epoll()
    ep.register(ring.fd, select.EPOLLIN)
    try:
        assert ep.poll(0.05) == []
        with VM() as vm:
            f = vm.create_gmem(4 * PAGE)
            f.populate()
            assert ep.poll(1.0)  # readable now
        assert len(ring.consume()) == 4 * EVENT_SIZE
    finally:
        ep.close()
