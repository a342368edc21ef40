"""A recording played back in time: the report as it stood at each step,
as a live run would have shown it (`top --replay`).  Records are fed in the
order they arrived, up to the step's time; the last step is the recording's
own report (its final map dump and trailer), equal to `report`'s."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from tracer.analysis.aggregator import Aggregator
from tracer.analysis.report import build
from tracer.base.errors import corrupt_content
from tracer.recording import format as rec


def play(path: str, step_ns: int) -> Iterator[Tuple[dict, int, bool]]:
    """(report, now in ns since the recording's base, last) every STEP_NS of
    recording time, from its first record to its end."""
    r = rec.read(path)
    with corrupt_content():
        yield from _play(r, max(1, step_ns))


class _Steps:
    """Records fed to an aggregator in arrival order, up to each step's time,
    with the map dumps written before them folded in as a reader folds them:
    one recording's side of a playback."""

    def __init__(self, agg: Aggregator, r: rec.Recording, events: np.ndarray, base: int):
        self.agg, self.r, self.events, self.base = agg, r, events, base
        ts = events["ts"].astype(np.int64) if len(events) else np.zeros(0, dtype=np.int64)
        # the prefix of arrival order whose records are all at or before a time
        self.reach = np.maximum.accumulate(ts) if len(ts) else ts
        self.fed = self.dumps = 0
        self.maps: Optional[dict] = None

    def to(self, t: int) -> None:
        """Feed the records at or before T (ns since BASE), fold the dumps written before them."""
        upto = int(np.searchsorted(self.reach, self.base + t, side="right"))
        if upto > self.fed:
            self.agg.feed(self.events[self.fed:upto])
            self.fed = upto
        while self.dumps < len(self.r.dump_spans) and self.r.dump_spans[self.dumps][0] <= self.fed:
            self.maps = rec.newer_maps(self.maps, self.r.dump(self.dumps))
            self.dumps += 1

    def rest(self) -> None:
        if len(self.events) > self.fed:
            self.agg.feed(self.events[self.fed:])
            self.fed = len(self.events)


def _times(start: int, last: int, step: int) -> Iterator[int]:
    """START, START+STEP, ... below LAST."""
    t = start
    while t < last:
        yield t
        t += step


def _play(r: rec.Recording, step: int) -> Iterator[Tuple[dict, int, bool]]:
    base = r.header.get("clock", {}).get("base_monotonic_ns", 0)
    agg = Aggregator(r.header.get("mode", "folio"), base)
    events = r.events
    end_ns = int((r.end or {}).get("duration_ns") or 0)
    last = max(end_ns, int(events["ts"].astype(np.int64).max()) - base if len(events) else 0)
    steps = _Steps(agg, r, events, base)
    for t in _times(step, last, step):
        steps.to(t)
        agg.finish(steps.maps)
        yield build(agg, r.header, {"stopped_by": "running", "duration_ns": t, "records": steps.fed}), t, False
    steps.rest()
    agg.finish(r.maps)
    yield build(agg, r.header, r.end, r.truncated, r.truncated_reason, r.damaged, r.damaged_records), last, True


def play_update(before: str, after: str, step_ns: int) -> Iterator[Tuple[dict, int, bool]]:
    """Both sides of a live update played as one (the old kernel's recording
    whole, then the new kernel's in steps), on the old recording's clock as
    `report BEFORE AFTER` joins them: each retrieve lands on the file the old
    kernel preserved.  The last step is that joined report."""
    from tracer.analysis.join import boots_maps, join_report, require_anchors, shifted
    from tracer.kernel import clock
    old, new = rec.read(before), rec.read(after)
    with corrupt_content():
        for r, p in ((old, before), (new, after)):
            require_anchors(p, r)
        base = old.header["clock"]["base_monotonic_ns"]
        agg = Aggregator(old.header.get("mode", "folio"), base)
        for batch in old.batches():
            agg.feed(batch)
        shift, _how = clock.offset(old.header["clock"], new.header["clock"])
        events = np.concatenate(list(shifted(new, shift))) if new.chunks else np.zeros(0, dtype=rec.EVENT_DTYPE)
        ts = events["ts"].astype(np.int64)
        start = int(ts.min()) - base if len(ts) else agg.last_ts - base
        last = int(ts.max()) - base if len(ts) else start
        steps = _Steps(agg, new, events, base)
        for t in _times(start, last, max(1, step_ns)):
            steps.to(t)
            agg.finish(boots_maps([old.maps, steps.maps]))
            yield build(agg, old.header, {"stopped_by": "running", "duration_ns": t}), t, False
    rep = join_report([before, after])
    yield rep, last, True
