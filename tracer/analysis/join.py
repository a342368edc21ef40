"""One report from recordings made on either side of a live update: the old
kernel's (preserve, freeze, cut short by the kexec) and the new kernel's
(retrieve, finish).

A file is the same file across the reboot through its serialized-data handle:
the old kernel's preserve returns it, the new kernel's retrieve and finish are
keyed by it (see Aggregator.ser_map).  Later recordings' timestamps are moved
onto the first one's clock (tracer/kernel/clock.py), so every phase of a file sits on
one axis: preserve, luo_freeze, the kexec, retrieve, finish; the blackout is
measured from the freeze (or the kexec when the freeze was not captured) to
the retrieve.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from tracer.kernel import clock
from tracer.recording import format as rec
from tracer.analysis.aggregator import Aggregator
from tracer.base.errors import LuotraceError, corrupt_content
from tracer.analysis.folio_progress import FolioProgress
from tracer.analysis.report import build, probe_row


def boots_maps(dumps: List[Optional[dict]]) -> dict:
    """Map dumps of several boots: rows side by side, counters summed."""
    out: dict = {"counters": {}, "folio_stats": [], "folio_hist": [], "population": [],
                 "population_attached": False}
    for d in dumps:
        if not d:
            continue
        for k, v in d.get("counters", {}).items():
            out["counters"][k] = out["counters"].get(k, 0) + int(v)
        for key in ("folio_stats", "folio_hist", "population"):
            out[key].extend(d.get(key, []))
        out["population_attached"] = out["population_attached"] or bool(d.get("population_attached"))
        if d.get("folio_source") and out.get("folio_source") != "array":
            # any boot that read folio arrays: its failed memfd preserves are
            # unknown, and unknown is said rather than a wrong 0
            out["folio_source"] = d["folio_source"]
    return out


def _boot_row(path: str, r: rec.Recording, shift: int, how: str, kexec: bool) -> dict:
    ck = r.header.get("clock", {})
    return {"recording": path, "kernel": r.header.get("kernel"), "boot_id": ck.get("boot_id") or None,
            "started": r.header.get("started"), "clock_offset_ns": shift, "joined_by": how,
            "ended_by": "kexec" if kexec and r.end is None else ("closed" if r.end else "cut short"),
            "truncated_reason": r.truncated_reason or None}


def join_report(paths: List[str]) -> dict:
    """The report of several recordings of one live update, oldest first."""
    return join_with_progress(paths, progress=False)[0]


def join_with_progress(paths: List[str], progress: bool = True) -> Tuple[dict, FolioProgress, int]:
    """The joined report; with PROGRESS, each file's folio progress on the
    first recording's clock (for a timeline: a second pass over the records);
    and that clock's zero.  Records are read a batch at a time: memory does
    not grow with the recordings."""
    with corrupt_content():
        return _join(paths, progress)


def require_anchors(path: str, r: rec.Recording) -> None:
    """A join puts recordings on one clock: each needs its anchors."""
    if "base_monotonic_ns" not in r.header.get("clock", {}):
        raise LuotraceError(f"{path}: recording has no clock anchors", "record it again with this luotrace")


def _read_sides(paths: List[str]) -> List[Tuple[str, rec.Recording]]:
    """The recordings, checked (clock anchors, each once), oldest first."""
    recs = [(p, rec.read(p)) for p in paths]
    for p, r in recs:
        require_anchors(p, r)
    seen: Dict[Tuple[str, int], str] = {}
    for p, r in recs:
        ident = (r.header["clock"].get("boot_id", ""), r.header["clock"]["base_monotonic_ns"])
        if ident in seen:
            raise LuotraceError(f"{p} and {seen[ident]} are the same recording",
                                "give each side of the update once: the old kernel's recording, then the new one's")
        seen[ident] = p
    recs.sort(key=lambda pr: pr[1].header["clock"]["base_realtime_ns"])
    return recs


def _aggregator(headers: List[dict]) -> Aggregator:
    """One aggregator on the first recording's clock, in the mode all sides share (light if any is)."""
    modes = {h.get("mode") for h in headers}
    mode = "light" if "light" in modes else str(next(iter(modes)) or "folio")
    return Aggregator(mode, headers[0]["clock"]["base_monotonic_ns"])


def _join(paths: List[str], progress: bool) -> Tuple[dict, FolioProgress, int]:
    recs = _read_sides(paths)
    first = recs[0][1]
    agg = _aggregator([r.header for _, r in recs])
    boots, ends_ns, shifts = [], [], []
    folios = FolioProgress()
    for p, r in recs:
        shift, how = clock.offset(first.header["clock"], r.header["clock"])
        shifts.append(shift)
        kexec_before = len(agg.kexec_ts)
        last = 0
        for batch in shifted(r, shift):
            last = max(last, agg.feed(batch))
            if progress:
                folios.scan(batch)
        if last and r.end is None:
            ends_ns.append(last)
        boots.append(_boot_row(p, r, shift, how, len(agg.kexec_ts) > kexec_before))
    agg.finish(boots_maps([r.maps for _, r in recs]))
    report = _assemble(agg, recs, boots, ends_ns)
    if progress:
        for (_, r), shift in zip(recs, shifts):
            for batch in shifted(r, shift):
                folios.count(batch)
    return report, folios, agg.base


def _assemble(agg: Aggregator, recs: List[Tuple[str, rec.Recording]], boots: List[dict],
              ends_ns: List[int], programs: Optional[dict] = None) -> dict:
    """The joined report from an aggregator fed every side (and finished):
    the boots, the probes of either side, each file's blackout across them."""
    ends = [(r.end or {}).get("bpf", {}) for _, r in recs]
    end = {"duration_ns": agg.last_ts - agg.base,
           "bpf": {"run_time_ns": sum(b.get("run_time_ns", 0) for b in ends),
                   "run_cnt": sum(b.get("run_cnt", 0) for b in ends),
                   "missed": sum(b.get("missed", 0) for b in ends),
                   "stats_enabled": any(b.get("stats_enabled") for b in ends),
                   **({"programs": programs} if programs else {})}}
    cut = [b for b in boots if b["ended_by"] == "cut short"]
    report = build(agg, recs[0][1].header, end, bool(cut), "; ".join(f"{b['recording']}: {b['truncated_reason']}"
                                                                     for b in cut),
                   [f"{p}: {d}" for p, r in recs for d in r.damaged], sum(r.damaged_records for _, r in recs))
    probes: Dict[Tuple[str, str], dict] = {}
    for _, r in recs:  # a probe missing on one side and attached on the other: attached
        for pr in r.header.get("probes", []):
            key = (pr["symbol"], pr["name"])
            if key not in probes or pr.get("status") == "attached":
                probes[key] = pr
    report["probes"] = [probe_row(pr) for pr in probes.values()]
    report["boots"] = boots
    report["kexec_ns"] = [t - agg.base for t in agg.kexec_ts]
    ends_rel = [e - agg.base for e in ends_ns]
    for f in report["files"]:
        f["blackout_ns"], f["blackout_from"] = blackout(f, report["kexec_ns"], ends_rel)
    return report


class LiveJoin:
    """`report BEFORE OUTPUT` kept current while a live run in the new kernel
    writes OUTPUT: the old kernel's recording is read and fed once, this run's
    records as they arrive (``feed``), so a frame costs a map read and a
    report build, not both recordings read again (155 ms a side for 1,000
    files in folio mode).  The run's end is joined from the files as `report`
    joins them; between, this is that join at the moment asked."""

    def __init__(self, before: str, header: dict, output: str):
        with corrupt_content():
            old = rec.read(before)
        require_anchors(before, old)
        self.before, self.output, self.old = before, output, old
        self.agg = _aggregator([old.header, header])
        self.old_last = 0
        with corrupt_content():
            for batch in old.batches():
                self.old_last = max(self.old_last, self.agg.feed(batch))
        self.old_kexec = bool(self.agg.kexec_ts)
        self.kexec_mark = len(self.agg.kexec_ts)
        self.new = rec.Recording(header=header, chunks=[])
        self.new_maps: Optional[dict] = None  # every dump of this run so far, merged as a reader merges them
        self.shift, self.how = clock.offset(old.header["clock"], header["clock"])
        self.new_last = 0

    def catch_up(self) -> None:
        """The records this run wrote before ``feed`` was hooked (OUTPUT, flushed, read so far)."""
        with corrupt_content():
            r = rec.read(self.output)
            for batch in r.batches():
                self.feed(batch)
        # a recording still being written reads as cut short, as `report` says of it
        self.new = rec.Recording(header=r.header, chunks=[], truncated=r.truncated,
                                 truncated_reason=r.truncated_reason, damaged=r.damaged,
                                 damaged_records=r.damaged_records)
        self.new_maps = r.maps

    def feed(self, batch: np.ndarray) -> None:
        """This run's records, as its aggregator gets them."""
        self.new_last = max(self.new_last, self.agg.feed(_shift(batch, self.shift)))

    def report(self, maps: Optional[dict], programs: Optional[dict] = None, now_ns: Optional[int] = None) -> dict:
        """The join as of now, with this run's map dump MAPS (its BPF
        programs' PROGRAMS for the cost line).  Dumps are merged as a reader
        merges a recording's: a file's row retired from the maps since (serve
        --keep-files) keeps its last numbers.  NOW_NS (this boot's
        CLOCK_MONOTONIC): the report's duration runs to it, not to the last
        record, so an open phase's clock runs between records."""
        if maps is not None:
            self.new_maps = rec.newer_maps(self.new_maps, maps)
        self.agg.finish(boots_maps([self.old.maps, self.new_maps]))
        boots = [_boot_row(self.before, self.old, 0, clock.offset(self.old.header["clock"], self.old.header["clock"])[1],
                           self.old_kexec),
                 _boot_row(self.output, self.new, self.shift, self.how, len(self.agg.kexec_ts) > self.kexec_mark)]
        ends_ns = [t for t, r in ((self.old_last, self.old), (self.new_last, self.new)) if t and r.end is None]
        rep = _assemble(self.agg, [(self.before, self.old), (self.output, self.new)], boots, ends_ns, programs)
        if now_ns is not None:
            rep["duration_ns"] = max(rep["duration_ns"] or 0, now_ns + self.shift - self.agg.base)
        return rep


def shifted(r: rec.Recording, shift: int):
    """R's batches moved by SHIFT ns onto the first recording's clock."""
    for batch in r.batches():
        yield _shift(batch, shift)


def _shift(batch: np.ndarray, shift: int) -> np.ndarray:
    """BATCH moved by SHIFT ns (a copy; the batch itself when SHIFT is 0)."""
    if not shift:
        return batch
    batch = batch.copy()
    batch["ts"] = (batch["ts"].astype(np.int64) + shift).astype(np.uint64)
    return batch


def blackout(f: dict, kexec_ns: List[int], boot_ends_ns: List[int]) -> Tuple[Optional[int], Optional[str]]:
    """From the file's freeze to the start of its retrieve, and what the start
    is: ``luo_freeze``; else ``kexec`` (the freeze was not captured: the CPUs
    stopped before the recorder wrote it); else ``recording end`` (not even the
    kexec was captured: the old kernel's last record, so an upper bound)."""
    retrieve = next((p for p in f["phases"] if p["name"] == "retrieve"), None)
    if retrieve is None:
        return None, None
    at = retrieve["start_ns"]
    for what, starts in (("luo_freeze", [p["start_ns"] for p in f["phases"] if p["name"] == "luo_freeze"]),
                         ("kexec", kexec_ns), ("recording end", boot_ends_ns)):
        before = [t for t in starts if t <= at]
        if before:
            return at - max(before), what
    return None, None
