"""A recording as a timeline for the Perfetto UI (or chrome://tracing), in
Chrome's JSON trace-event format.

One process per LUO session, one track (thread) per preserved file, phases as
slices, the session's LUO freeze (the blackout) on its own track, anomalies
and errors as instant events carrying their evidence, and per-file folio
progress as a counter.  Downsampling keeps the file openable whatever the
recording's size: a file's folio counter gets at most MAX_POINTS samples
(per-folio records are binned over equal time steps, a batch at a time, by
tracer/analysis/folio_progress.py); slices and instants are per phase and per anomaly,
so they stay few.
"""
from __future__ import annotations

import json
from typing import Dict, List

from tracer.probes import catalog
from tracer.analysis.folio_progress import MAX_POINTS, FolioProgress
from tracer.base.output import write_output

NO_SESSION = 0


def _us(ns: int) -> float:
    return ns / 1000.0


LIVE_UPDATE_PID = 1 << 20  # the kernels and the jump between them, above every session


def build(folios: FolioProgress, base: int, report: dict) -> dict:
    """``folios``: each file's folio progress on the report's clock (one
    recording's, or several joined by tracer/analysis/join.py), ``base`` its zero."""
    ev: List[dict] = _live_update(report)
    sessions = {s["id"]: s for s in report.get("sessions", [])}
    tids: Dict[int, int] = {}
    for pid in sorted({f["session"] or NO_SESSION for f in report["files"] if f["result"] != "none"}):
        name = f"LUO session {pid}" if pid else "files outside a session"
        ev.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        ev.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        s = sessions.get(pid)
        if s and s.get("blackout_ns") is not None and s.get("blackout_start_ns") is not None:
            ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "blackout (LUO freeze)"}})
            ev.append({"ph": "X", "name": "blackout: luo_file_freeze", "pid": pid, "tid": 1,
                       "ts": _us(s["blackout_start_ns"]), "dur": _us(s["blackout_ns"]),
                       "args": {"files": len(s["files"]), "errno": s.get("freeze_errno")}})
    for n, f in enumerate(f for f in report["files"] if f["result"] != "none"):
        pid, tid = f["session"] or NO_SESSION, 100 + n
        tids[f["inode"]] = tid
        ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                   "args": {"name": f"{f['handler']} inode {f['inode']}"}})
        ev.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        for p in f["phases"]:
            args = {k: p[k] for k in ("errno", "count") if k in p}
            ev.append({"ph": "X", "name": p["name"], "cat": "phase", "pid": pid, "tid": tid,
                       "ts": _us(p["start_ns"]), "dur": _us(p["duration_ns"]), "args": args})
        if f.get("blackout_ns") is not None:
            retrieve = next(p for p in f["phases"] if p["name"] == "retrieve")
            ev.append({"ph": "X", "name": f"blackout (from {f['blackout_from']})", "cat": "blackout", "pid": pid,
                       "tid": tid, "ts": _us(retrieve["start_ns"] - f["blackout_ns"]), "dur": _us(f["blackout_ns"]),
                       "args": {"blackout_ns": f["blackout_ns"]}})
        end = max((p["start_ns"] + p["duration_ns"] for p in f["phases"]), default=0)
        if f["errno"]:  # where it failed: the end of the failing phase
            failed = [p["start_ns"] + p["duration_ns"] for p in f["phases"]
                      if p["name"] == f["failed_phase"] and p.get("errno")]
            ev.append({"ph": "i", "s": "t", "name": f"error {f['errno']} in {f['failed_phase']}", "cat": "error",
                       "pid": pid, "tid": tid, "ts": _us(failed[0] if failed else end),
                       "args": {"result": f["result"]}})
        for a in f["anomalies"]:  # at its first evidence, when known
            t = a.get("time_ns")
            ev.append({"ph": "i", "s": "t", "name": a["code"], "cat": "anomaly", "pid": pid, "tid": tid,
                       "ts": _us(end if t is None else t),
                       "args": {k: v for k, v in a.items() if k not in ("code", "time_ns") and v is not None}})
        ev += _folio_counter(f, pid, folios, base)
    return {"traceEvents": ev, "displayTimeUnit": "ns",
            "metadata": {"luotrace": report.get("recording", {}), "downsampling":
                         f"folio counters: at most {MAX_POINTS} samples per file"}}


def _live_update(report: dict) -> List[dict]:
    """A joined report's kernels as spans on one track, the kexec as an instant."""
    boots = report.get("boots") or []
    if not boots and not report.get("kexec_ns"):
        return []
    pid = LIVE_UPDATE_PID
    ev = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": "live update"}},
          {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": -1}},
          {"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "kernels"}}]
    for k in report.get("kexec_ns", []):
        ev.append({"ph": "i", "s": "g", "name": "kexec", "cat": "kexec", "pid": pid, "tid": 1, "ts": _us(k)})
    for i, b in enumerate(boots):
        ev.append({"ph": "i", "s": "p", "name": f"boot {i + 1}: {b['kernel']} ({b['ended_by']})", "cat": "boot",
                   "pid": pid, "tid": 1, "ts": _us(b["clock_offset_ns"]),
                   "args": {k: b[k] for k in ("recording", "boot_id", "joined_by", "clock_offset_ns")}})
    return ev


def _folio_counter(f: dict, pid: int, folios: FolioProgress, base: int) -> List[dict]:
    name = "folios preserved"
    ends, cum = folios.series(f["inode"])
    if len(ends):  # streamed records: the count at each of equal time steps
        return [{"ph": "C", "name": name, "pid": pid, "tid": 0, "ts": _us(int(x) - base),
                 "args": {f"inode {f['inode']}": int(c)}} for x, c in zip(ends, cum)]
    fill = next((p for p in f["phases"] if p["name"] in catalog.FILL_PHASES), None)
    if fill is None or f.get("folios_preserved") is None:
        return []
    return [{"ph": "C", "name": name, "pid": pid, "tid": 0, "ts": _us(fill["start_ns"]),
             "args": {f"inode {f['inode']}": 0}},
            {"ph": "C", "name": name, "pid": pid, "tid": 0, "ts": _us(fill["start_ns"] + fill["duration_ns"]),
             "args": {f"inode {f['inode']}": f["folios_preserved"]}}]


def write(folios: FolioProgress, base: int, report: dict, out: str) -> int:
    doc = build(folios, base, report)
    write_output(out, json.dumps(doc).encode(), "timeline")
    return len(doc["traceEvents"])
