"""What `luotrace top` shows, computed from reports: where the host is in
the update, each file's phase and how long it has run, progress that says
where its number comes from, and stalls with the rule that flagged them.

Pure: a report (``report --json``'s schema, from a live run, a serve or a
recording played back) and the time it is of go in, a View comes out; the
renderers are exporters/top_text.py.  Numbers are never invented:
- a file's total is its count pass's result (exact), known once pass 1 returns;
- in folio mode the fill pass has no per-folio signal: its progress is an
  estimate from this host's earlier updates (their fill pass per folio), shown
  as one, and never reaches the total before the phase returns;
- in trace mode (or folio mode with --folio-latency) each folio is an event:
  the count is exact.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from tracer.analysis.aggregator import FINAL_RESULTS
from tracer.probes import catalog

SCHEMA = "luotrace.top/1"
STALL_FACTOR = 5.0  # a phase is stalled past this many times what history predicts ...
STALL_MIN_NS = 1_000_000_000  # ... and at least this long
PREPARE = ("can_preserve", "preserve", "count_pass", "fill_pass", "preserve_folios", "vmalloc")
# a file's state, from its report row: where it is in the update
STATES = {"none": "seen", "ok": "preserved", "retrieved": "retrieved", "discarded": "discarded",
          "cancelled": "cancelled", "rejected": "rejected", "error": "error"}
FOLIO_EVENTS = ("kho_preserve_folio",)  # streamed per-folio events that count a preserve's progress


@dataclass
class History:
    """This host's earlier updates: per (handler, phase) the median time per
    folio of a walk pass and the median duration of every phase."""
    per_folio_ns: Dict[Tuple[str, str], float] = field(default_factory=dict)
    duration_ns: Dict[Tuple[str, str], float] = field(default_factory=dict)
    updates: int = 0

    @classmethod
    def of(cls, reports: Iterable[dict]) -> "History":
        per: Dict[Tuple[str, str], List[float]] = {}
        dur: Dict[Tuple[str, str], List[float]] = {}
        n = 0
        for rep in reports:
            n += 1
            for f in rep.get("files", []):
                for p in f.get("phases", []):
                    key = (f["handler"], p["name"])
                    dur.setdefault(key, []).append(p["duration_ns"])
                    if p.get("count"):
                        per.setdefault(key, []).append(p["duration_ns"] / p["count"])
        return cls({k: statistics.median(v) for k, v in per.items()},
                   {k: statistics.median(v) for k, v in dur.items()}, n)

    def predict(self, handler: str, phase: str, folios: Optional[int]) -> Optional[float]:
        """How long PHASE of a file of FOLIOS should take here; None: no history."""
        if folios and (handler, phase) in self.per_folio_ns:
            return self.per_folio_ns[(handler, phase)] * folios
        return self.duration_ns.get((handler, phase))


@dataclass
class Row:
    key: str  # handler:dev:inode
    handler: str
    inode: int
    session: Optional[int]
    size_bytes: Optional[int]
    state: str
    phase: Optional[str]  # the phase running now, else the last one run
    running: bool
    phase_ns: Optional[int]  # how long the phase has run (or took)
    done: Optional[int]  # folios done in the phase shown
    total: Optional[int]  # folios to do (the count pass's result)
    progress: Optional[str]  # "exact", "est." or None (no number)
    rate: Optional[float]  # folios/s
    eta_ns: Optional[int]
    errno: Optional[str]
    failed_phase: Optional[str]
    anomalies: List[dict]
    stall: Optional[str]  # the rule that flagged it
    preserved: Optional[int]
    restored: Optional[int]
    before_preserved: Optional[int] = None  # across the kexec: what the old kernel preserved of it
    since_change_ns: int = 0  # how long its progress has not moved (where it is observable)


@dataclass
class View:
    schema: str
    at_ns: int  # since the recording's base
    state: str  # idle | preserving | frozen | preserved | kexec | retrieving | done
    kernel: Optional[str]
    boot_id: Optional[str]
    mode: Optional[str]
    files: int
    bytes: int
    sessions: List[dict]
    bpf_runs: Optional[int]  # BPF program runs since the last view
    bpf_cpu_pct: Optional[float]  # their CPU share of one CPU since the last view
    lost: int
    rows: List[Row]
    missing: List[dict]  # across the kexec: files the old kernel preserved that this one has not retrieved
    finished: bool = False  # the run (or recording) has ended
    bpf_run_cnt: Optional[int] = None  # cumulative, as the report has them (the next view's interval)
    bpf_run_time_ns: Optional[int] = None
    missed: int = 0  # runs of luotrace's programs the kernel skipped (report bpf.missed), cumulative

    def to_json(self) -> dict:
        return asdict(self)


def _phase_of(probe: str, f: dict) -> Optional[str]:
    """The phase an open call is: its probe's role, a walk's pass by whether pass 1 returned."""
    p = catalog.BY_NAME.get(probe)
    if p is None:
        return None
    if p.role == "walk":
        first, second = catalog.HANDLER_BY_NAME[f["handler"]].walk
        return second if any(ph["name"] == first for ph in f.get("phases", [])) else first
    return p.role if p.role in catalog.PHASE_ORDER else None


def _running(f: dict) -> Tuple[Optional[str], Optional[int]]:
    """The innermost open phase of F and its start (ns since base)."""
    best: Tuple[Optional[str], Optional[int]] = (None, None)
    for probe, since in (f.get("in_progress_since_ns") or {}).items():
        ph = _phase_of(probe, f)
        if ph and (best[1] is None or since >= best[1]):
            best = (ph, since)
    return best


def _row(f: dict, now: int, mode: Optional[str], hist: History, prev: Optional[Row], dt_ns: int,
         stall_ns: int, before: Optional[dict]) -> Row:
    phase, since = _running(f)
    running = phase is not None
    done: Optional[int] = None
    total: Optional[int] = None
    progress: Optional[str] = None
    rate: Optional[float] = None
    eta: Optional[int] = None
    stall: Optional[str] = None
    phase_ns: Optional[int] = None
    if phase is not None:
        elapsed = max(0, now - (since or 0))
        total = f.get("nr_folios") if phase != catalog.HANDLER_BY_NAME[f["handler"]].walk[0] else None
        streamed = sum((f.get("streamed_events") or {}).get(e, 0) for e in FOLIO_EVENTS)
        walk2 = phase == catalog.HANDLER_BY_NAME[f["handler"]].walk[1]
        after_preserve = phase in ("luo_freeze", "unpreserve", "retrieve", "finish")
        if after_preserve and f.get("folios_preserved") is not None and f["result"] != "none":
            done, total, progress = f["folios_preserved"], f.get("nr_folios"), "exact"
        elif walk2 and streamed:  # every folio an event: exact
            done, progress = streamed, "exact"
        elif walk2 and total and (f["handler"], phase) in hist.per_folio_ns:
            est = int(elapsed / hist.per_folio_ns[(f["handler"], phase)])
            done, progress = min(est, total - 1), "est."  # never the total before the phase returns
        if progress == "exact" and prev is not None and prev.phase == phase and prev.done is not None and dt_ns > 0:
            rate = max(0.0, (done - prev.done) * 1e9 / dt_ns)  # type: ignore[operator]
        elif progress == "est.":
            rate = 1e9 / hist.per_folio_ns[(f["handler"], phase)]
        if rate and total is not None and done is not None:
            eta = int((total - done) / rate * 1e9)
        moved = prev is None or prev.phase != phase or prev.done != done or progress != "exact"
        since_change = 0 if moved else prev.since_change_ns + dt_ns  # type: ignore[union-attr]
        pages = (f.get("size_bytes") or 0) // 4096 or None
        predicted = hist.predict(f["handler"], phase, total or pages)
        if predicted is not None and elapsed > max(STALL_FACTOR * predicted, STALL_MIN_NS):
            stall = (f"history: {phase} has run {elapsed / 1e9:.1f} s where this host's {hist.updates} earlier "
                     f"update(s) predict {predicted / 1e9:.3f} s (x{STALL_FACTOR:g} allowed)")
        elif progress == "exact" and since_change >= stall_ns:
            stall = f"no progress: {phase} at {done} of {total} folios for {since_change / 1e9:.0f} s"
        elif predicted is None and progress is None and elapsed >= stall_ns:
            stall = f"open: {phase} has run {elapsed / 1e9:.0f} s with no history and no progress signal"
        phase_ns = elapsed
    else:
        since_change = 0
        last = max(f.get("phases") or [], key=lambda p: p["start_ns"] + p["duration_ns"], default=None)
        phase, phase_ns = (last["name"], last["duration_ns"]) if last else (None, None)
        if f["result"] != "none" and f.get("folios_preserved") is not None:
            done, total, progress = f["folios_preserved"], f.get("nr_folios"), "exact"
    return Row(key=f"{f['handler']}:{f['dev']}:{f['inode']}", handler=f["handler"], inode=f["inode"],
               session=f.get("session"), size_bytes=f.get("size_bytes"),
               state="preparing" if f["result"] == "none" and running else STATES.get(f["result"], f["result"]),
               phase=phase, running=running, phase_ns=phase_ns, done=done, total=total, progress=progress, rate=rate,
               eta_ns=eta, errno=f.get("errno"), failed_phase=f.get("failed_phase"),
               anomalies=[{"code": a["code"], "detail": a.get("detail", "")} for a in f.get("anomalies", [])],
               stall=stall, preserved=f.get("folios_preserved"), restored=f.get("folios_restored"),
               before_preserved=(before or {}).get("folios_preserved"), since_change_ns=since_change)


def _update_state(rows: List[Row], sessions: List[dict], rep: dict, retrieving_side: bool) -> str:
    if not rows:
        return "idle"
    if any(r.running and r.phase in ("retrieve", "finish") for r in rows):
        return "retrieving"
    if any(r.running and r.phase in PREPARE for r in rows):
        return "preserving"
    if any(s["frozen"] for s in sessions):
        return "frozen"
    waiting = [r for r in rows if r.state == "preserved"]
    if waiting and rep.get("kexec_ns"):
        return "kexec"
    if waiting:
        return "retrieving" if retrieving_side else "preserved"
    return "done"


def view(rep: dict, now_ns: int, hist: Optional[History] = None, prev: Optional[View] = None,
         stall_s: float = 30.0, before: Optional[dict] = None, finished: bool = False) -> View:
    """The view of REP as of NOW_NS (ns since the recording's base).  PREV:
    the last view (rates, BPF cost and "no progress" clocks need it).
    BEFORE: the old kernel's report of this update, in the new kernel: each
    file's retrieve is shown against what it preserved, and what it
    preserved but this kernel has not retrieved is listed as missing."""
    hist = hist or History()
    rec = rep.get("recording") or {}
    dt = now_ns - prev.at_ns if prev is not None else 0
    prev_rows = {r.key: r for r in prev.rows} if prev is not None else {}
    olds = _before_rows(before)
    rows = []
    for f in rep.get("files", []):
        if f["result"] == "rejected" or (f["result"] == "none" and not f.get("in_progress")):
            continue  # refused by this handler (another one's file), or a file not (yet) in an update
        old = olds.get(_file_key(f))
        rows.append(_row(f, now_ns, rec.get("mode"), hist, prev_rows.get(f"{f['handler']}:{f['dev']}:{f['inode']}"),
                         dt, int(stall_s * 1e9), old))
    sessions = []
    back = {f["inode"] for f in rep.get("files", []) if f["result"] in ("retrieved", "discarded")}
    for s in rep.get("sessions", []):
        # a freeze with no return seen: still running, unless the jump cut it (the CPUs
        # stopped first) and the new kernel has since taken every one of its files back
        frozen = s.get("blackout_start_ns") is not None and s.get("blackout_ns") is None and not s.get("cancelled") \
            and not (s.get("files") and set(s["files"]) <= back)
        blackout = (now_ns - s["blackout_start_ns"]) if frozen else s.get("blackout_ns")
        sessions.append({"id": s["id"], "frozen": frozen, "blackout_ns": blackout, "files": len(s.get("files", []))})
    in_update = [r for r in rows if r.state != "seen"]
    bpf = rep.get("bpf") or {}
    # no program named: no cost known (a recording played back between its dumps, a service not yet tracing)
    runs, run_ns = (bpf.get("run_cnt"), bpf.get("run_time_ns")) if bpf.get("programs") else (None, None)
    cpu = d_runs = None
    if prev is not None and dt > 0 and prev.bpf_run_cnt is not None and runs is not None:
        d_runs = runs - prev.bpf_run_cnt
        if prev.bpf_run_time_ns is not None and run_ns is not None:
            cpu = 100.0 * (run_ns - prev.bpf_run_time_ns) / dt
        if d_runs < 0 or (cpu is not None and cpu < 0):  # the end's counters are of another reading: no interval
            d_runs = cpu = None
    missing = []
    if before is not None and finished:  # until the end, a file not retrieved yet is only waiting
        seen = {_file_key(f) for f in rep.get("files", []) if f.get("retrieved_inode") or
                f["result"] in ("retrieved", "discarded") or
                any(p["name"] in ("retrieve", "finish") for p in f.get("phases") or ())}
        missing = [{"handler": o["handler"], "inode": o["inode"], "token": o.get("token"),
                    "preserved": o.get("folios_preserved")} for k, o in sorted(olds.items()) if k not in seen]
    v = View(schema=SCHEMA, at_ns=now_ns, state=_update_state(rows, sessions, rep, before is not None),
             kernel=rec.get("kernel"), boot_id=(rep.get("update") or {}).get("boot_id"), mode=rec.get("mode"),
             files=len(in_update), bytes=sum(r.size_bytes or 0 for r in in_update), sessions=sessions,
             bpf_runs=d_runs, bpf_cpu_pct=cpu,
             lost=int((rep.get("events") or {}).get("lost") or 0), rows=rows, missing=missing, finished=finished,
             bpf_run_cnt=runs, bpf_run_time_ns=run_ns, missed=int(bpf.get("missed") or 0))
    return v


def _file_key(f: dict) -> Tuple[str, int, int]:
    return f["handler"], f.get("dev") or 0, f["inode"]


def _before_rows(before: Optional[dict]) -> Dict[Tuple[str, int, int], dict]:
    """The old kernel's preserved files by what the joined report keeps them
    as (handler, dev, inode: the new kernel's retrieve lands on that row, by
    the serialized-data handle), not by token: a token is chosen per session
    and repeats across sessions (the kexec selftests' do)."""
    if not before:
        return {}
    return {_file_key(f): f for f in before.get("files", []) if f["result"] in ("ok", "retrieved")}


def changes(prev: Optional[View], cur: View) -> List[Tuple[str, str]]:
    """(key, what changed) per file since PREV: what --plain prints a line for."""
    old = {r.key: r for r in prev.rows} if prev is not None else {}
    out = []
    for r in cur.rows:
        o = old.get(r.key)
        if o is None:
            out.append((r.key, "appeared"))
            continue
        if (o.state, o.phase, o.running) != (r.state, r.phase, r.running):
            out.append((r.key, "phase"))
        if {a["code"] for a in r.anomalies} - {a["code"] for a in o.anomalies}:
            out.append((r.key, "anomaly"))
        if r.stall and not o.stall:
            out.append((r.key, "stall"))
        if r.errno and not o.errno:
            out.append((r.key, "error"))
    return out


def final_of(rep: dict) -> Dict[str, dict]:
    """Per file key, the numbers a final view must equal (those `report --json` gives)."""
    return {f"{f['handler']}:{f['dev']}:{f['inode']}": {"state": STATES.get(f["result"], f["result"]),
                                                         "preserved": f.get("folios_preserved"),
                                                         "restored": f.get("folios_restored"),
                                                         "anomalies": sorted(a["code"] for a in f.get("anomalies", []))}
            for f in rep.get("files", []) if f["result"] not in ("rejected", "none")}


def final_rows(v: View) -> Dict[str, dict]:
    return {r.key: {"state": r.state, "preserved": r.preserved, "restored": r.restored,
                    "anomalies": sorted(a["code"] for a in r.anomalies)} for r in v.rows}


def done(r: Row) -> bool:
    return r.state in {STATES[x] for x in FINAL_RESULTS}
