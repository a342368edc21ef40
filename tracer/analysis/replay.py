"""A recording's report: the aggregator fed with its records and map dumps,
exactly what the live run showed.  Analysis only: no BPF, no root."""
from __future__ import annotations

from tracer.recording import format as rec
from tracer.analysis.aggregator import Aggregator
from tracer.base.errors import corrupt_content
from tracer.analysis.report import build


def replay(path: str) -> dict:
    """The report of a recording: exactly what the live run showed."""
    return report_of(rec.read(path))


def report_of(r: rec.Recording) -> dict:
    with corrupt_content():
        return _report_of(r)


def _report_of(r: rec.Recording) -> dict:
    agg = Aggregator(r.header.get("mode", "folio"), r.header.get("clock", {}).get("base_monotonic_ns", 0))
    for batch in r.batches():
        agg.feed(batch)
    agg.finish(r.maps)
    return build(agg, r.header, r.end, r.truncated, r.truncated_reason, r.damaged, r.damaged_records)
