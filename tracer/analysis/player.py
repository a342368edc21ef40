"""A recording played back in time: the report as it stood at each step,
as a live run would have shown it (`top --replay`).  Records are fed in the
order they arrived, up to the step's time; the last step is the recording's
own report (its final map dump and trailer), equal to `report`'s."""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

from tracer.analysis.aggregator import Aggregator
from tracer.analysis.report import build
from tracer.base.errors import LuotraceError, corrupt_content
from tracer.recording import format as rec


def play(path: str, step_ns: int) -> Iterator[Tuple[dict, int, bool]]:
    """(report, now in ns since the recording's base, last) every STEP_NS of
    recording time, from its first record to its end."""
    r = rec.read(path)
    with corrupt_content():
        yield from _play(r, max(1, step_ns))


def _play(r: rec.Recording, step: int) -> Iterator[Tuple[dict, int, bool]]:
    base = r.header.get("clock", {}).get("base_monotonic_ns", 0)
    agg = Aggregator(r.header.get("mode", "folio"), base)
    events = r.events
    ts = events["ts"].astype(np.int64) if len(events) else np.zeros(0, dtype=np.int64)
    end_ns = int((r.end or {}).get("duration_ns") or 0)
    last = max(end_ns, int(ts.max()) - base if len(ts) else 0)
    # the prefix of arrival order whose records are all at or before each step
    reach = np.maximum.accumulate(ts) if len(ts) else ts
    fed = dumps = 0
    maps = None  # the map dumps written before the records fed so far, merged as a reader merges them
    t = min(step, last)
    while True:
        final = t >= last
        upto = len(events) if final else int(np.searchsorted(reach, base + t, side="right"))
        if upto > fed:
            agg.feed(events[fed:upto])
            fed = upto
        if final:
            agg.finish(r.maps)
            yield build(agg, r.header, r.end, r.truncated, r.truncated_reason, r.damaged, r.damaged_records), last, True
            return
        while dumps < len(r.dump_spans) and r.dump_spans[dumps][0] <= fed:
            maps = rec.newer_maps(maps, r.dump(dumps))
            dumps += 1
        agg.finish(maps)
        yield build(agg, r.header, {"stopped_by": "running", "duration_ns": t, "records": fed}), t, False
        t = min(t + step, last)


def play_update(before: str, after: str, step_ns: int) -> Iterator[Tuple[dict, int, bool]]:
    """Both sides of a live update played as one (the old kernel's recording
    whole, then the new kernel's in steps), on the old recording's clock as
    `report BEFORE AFTER` joins them: each retrieve lands on the file the old
    kernel preserved.  The last step is that joined report."""
    from tracer.analysis.join import shifted, boots_maps, join_report
    from tracer.kernel import clock
    old, new = rec.read(before), rec.read(after)
    with corrupt_content():
        for r, p in ((old, before), (new, after)):
            if "base_monotonic_ns" not in r.header.get("clock", {}):
                raise LuotraceError(f"{p}: recording has no clock anchors", "record it again with this luotrace")
        base = old.header["clock"]["base_monotonic_ns"]
        agg = Aggregator(old.header.get("mode", "folio"), base)
        for batch in old.batches():
            agg.feed(batch)
        shift, _how = clock.offset(old.header["clock"], new.header["clock"])
        events = np.concatenate(list(shifted(new, shift))) if new.chunks else np.zeros(0, dtype=rec.EVENT_DTYPE)
        ts = events["ts"].astype(np.int64)
        reach = np.maximum.accumulate(ts) if len(ts) else ts
        start = int(ts.min()) - base if len(ts) else agg.last_ts - base
        last = int(ts.max()) - base if len(ts) else start
        fed, dumps, maps = 0, 0, None
        t = start
        while t < last:
            upto = int(np.searchsorted(reach, base + t, side="right"))
            if upto > fed:
                agg.feed(events[fed:upto])
                fed = upto
            while dumps < len(new.dump_spans) and new.dump_spans[dumps][0] <= fed:
                maps = rec.newer_maps(maps, new.dump(dumps))
                dumps += 1
            agg.finish(boots_maps([old.maps, maps]))
            yield build(agg, old.header, {"stopped_by": "running", "duration_ns": t}), t, False
            t += max(1, step_ns)
    rep = join_report([before, after])
    yield rep, last, True
