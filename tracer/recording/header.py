"""The recording's header (schema: tracer/schemas/recording-header.schema.json),
built in one place for `record`/`serve` and for `simulate`, so that a
simulated recording says what a live one says and the two cannot drift."""
from __future__ import annotations

import time
from typing import Dict, List, Optional

from tracer import __version__
from tracer.probes.events import EVENT_SIZE


def build(*, kernel: str, hostname: str, mode: str, target: str, labels: Dict[str, str], base_ns: int,
          real_ns: int, clock_source: str, probes: List[dict], gmem: dict, layout: dict, sample_every: int,
          ringbuf_pages: Optional[int] = None, folio_ringbuf_pages: Optional[int] = None, **extra) -> dict:
    """GMEM: what the guest_memfd files are (backing, why) and the superblock
    the population probes watch (dev).  The ring sizes are a live run's only.
    EXTRA: further top-level keys the schema allows (a simulation's spec)."""
    head = {
        "format": "luotrace.recording",
        "luotrace_version": __version__,
        "kernel": kernel,
        "hostname": hostname,
        "mode": mode,
        "target": target,
        "labels": labels,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(real_ns / 1e9)),
        "clock": {"base_monotonic_ns": base_ns, "base_realtime_ns": real_ns, "source": clock_source},
        "probes": probes,
        "gmem": gmem,
        "layout": layout,
        "sample_every": sample_every,
    }
    if ringbuf_pages is not None:
        head["ringbuf_pages"] = ringbuf_pages  # the lifecycle ring (recordings keep this key)
    if folio_ringbuf_pages is not None:
        head["folio_ringbuf_pages"] = folio_ringbuf_pages
    head["event_size"] = EVENT_SIZE
    head.update(extra)
    return head
