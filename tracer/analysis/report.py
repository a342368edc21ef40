"""The report: per-file timelines, sessions, anomalies and totals, as one
JSON-able dict with a versioned schema.  Renderers live in exporters/.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from tracer.analysis import anomalies
from tracer.analysis.aggregator import FINAL_RESULTS, Aggregator, FileState, Key
from tracer.kernel.abi import SER_DEV
from tracer.probes.catalog import HANDLER_BY_NAME, HANDLER_NAMES, HANDLERS, PHASE_ORDER, POPULATED, PROBES
from tracer.probes.events import errno_name
from tracer.analysis.totals import Totals

SCHEMA = "luotrace.report/1"


def _index(rows: List[dict]) -> Dict[Tuple[int, int, int], dict]:
    return {(r["handler"], r["dev"], r["ino"]): r for r in rows}


def _merge_ser_rows(agg: Aggregator, rows: List[dict]) -> Dict[Tuple[int, int, int], dict]:
    """folio_stats rows keyed by a serialized-data handle (retrieve/finish) are
    added to the file that handle belongs to."""
    out: Dict[Tuple[int, int, int], dict] = {}
    for r in rows:
        key = (r["handler"], r["dev"], r["ino"])
        if r["dev"] == SER_DEV:
            key = agg.ser_map.get((r["handler"], r["ino"]), key)
        cur = out.setdefault(key, {k: 0 for k in r if k not in ("handler", "dev", "ino")})
        for k, v in r.items():
            if k not in ("handler", "dev", "ino"):
                cur[k] = cur.get(k, 0) + v  # a field an older luotrace did not write counts 0
    return out


# handlers whose inode freeze is always traced (a required probe): a preserve
# that never froze its inode never reached its walks
FREEZE_TRACED = frozenset(p.handler for p in PROBES if p.role == "freeze_inode" and p.required)

# a file folio mode saw no folio call for, when its counts come from the array
EMPTY_FOLIO_ROW = {"preserved": 0, "preserve_errors": 0, "unpreserved": 0, "restored": 0, "discarded": 0,
                   "pfn_zero": 0, "array_walked": 0, "array_unread": 0, "unpreserve_unread": 0, "pfn_zero_last": 0}


def _file_json(st: FileState, agg: Aggregator, folio: Optional[dict], pop: Optional[dict],
               hist: Dict[int, int]) -> dict:
    base = agg.base
    folio_mode = agg.mode != "light"
    # "update" policy: population counted only while files were in an update,
    # so a file's count since its creation is unknown (its races are not)
    partial_pop = (agg.maps or {}).get("population_policy") == "update"
    phases = sorted(st.phases, key=lambda p: (p.start_ns, PHASE_ORDER.index(p.name)))
    preserve = next((p for p in phases if p.name == "preserve"), None)
    # folio mode read the file's folio array, which a failed preserve never
    # hands over: its count is then its walk's, as in light mode
    from_array = folio_mode and (agg.maps or {}).get("folio_source") == "array"
    if folio_mode and not (from_array and st.failed_phase == "preserve"):
        preserved = folio["preserved"] if folio is not None else 0
    elif preserve is None:
        preserved = 0  # never got to its handler's preserve (refused by every handler)
    elif st.handler in FREEZE_TRACED and not st.freeze_log:
        preserved = 0  # failed before freezing the inode, which comes before any walk (e.g. its VM token)
    elif not HANDLER_BY_NAME[st.handler].walk_counts_on_error and st.failed_phase == "preserve":
        preserved = None  # light mode: its walk (memfd_luo_preserve_folios) reports no count on error
    elif st.fill_count is not None:
        preserved = st.fill_count  # light mode: pass 2's count
    elif st.count_pass is not None:
        preserved = 0  # pass 1 ran, pass 2 never did
    else:
        preserved = None  # light mode without the (static, often inlined) walk probe: unknown
    if from_array:
        folio = {**EMPTY_FOLIO_ROW, **(folio or {}), "preserved": preserved}
        if folio["unpreserve_unread"] or (st.failed_phase == "preserve" and preserved != 0):
            # a failed preserve's unwind hands no array back; a cancel's preserve was not read whole
            folio["unpreserved"] = None
    d = {
        "inode": st.key[2],
        "dev": st.key[1],
        "handler": st.handler,
        "session": st.session,
        "token": st.token,
        "size_bytes": st.size,
        "flags": st.flags,
        "folios_populated": None if partial_pop else (
            pop["added"] if pop else (0 if folio_mode and st.handler in POPULATED and
                                      (agg.maps or {}).get("population_attached") else None)),
        "nr_folios": st.count_pass,
        "folios_preserved": preserved if st.result != "none" else 0,
        "folios_unpreserved": folio["unpreserved"] if folio_mode and folio else (0 if folio_mode else None),
        "folios_restored": folio["restored"] if folio_mode and folio else (0 if folio_mode else None),
        "folios_discarded": folio["discarded"] if folio_mode and folio else (0 if folio_mode else None),
        # KHO's own metadata pages are seen only per call (kho_preserve_folio)
        "metadata_folios": folio.get("meta_preserved", 0) if folio_mode and folio and not from_array else None,
        "result": st.result,
        "errno": st.errno,
        "failed_phase": st.failed_phase,
        "vm_token": st.vm_token,
        "vm_token_in": st.vm_token_in,
        "vm_token_errno": st.vm_token_errno,
        "retrieved_inode": st.retrieved_inode,
        "preserve": {"start_ns": preserve.start_ns - base, "duration_ns": preserve.duration_ns} if preserve else None,
        "phases": [p.to_json(base) for p in phases],
        "in_progress": sorted(st.open_calls),
    }
    if st.open_calls:  # since when (a live view's phase clocks); absent once nothing is open
        d["in_progress_since_ns"] = {n: ts - base for n, ts in sorted(st.open_calls.items())}
    if hist:
        d["folio_latency_log2_ns"] = {str(k): v for k, v in sorted(hist.items())}
        d["folio_preserve_ns_total"] = folio["preserve_ns"] if folio else None
    if st.streamed:
        d["streamed_events"] = dict(sorted(st.streamed.items()))
    # a file still inside a call is judged when it returns: half a preserve is not yet unbalanced or
    # mismatched (its folio array is read at the end), and a live report must not count what vanishes
    d["anomalies"] = [] if st.open_calls else anomalies.check(
        anomalies.Facts(st, folio if folio_mode else None, pop, not partial_pop), base)
    not_checked = []
    if from_array and folio and folio["unpreserved"] is None:
        not_checked.append("unwind_incomplete")  # how many its unwind (or cancel) gave back is unknown
    if from_array and folio and folio.get("array_unread"):
        not_checked.append("pfn_zero")  # a page of its folio array could not be read
    if not_checked:
        d["anomalies_not_checked"] = not_checked
    return d


Rows = Tuple[List[Tuple[Key, dict]], Dict[Key, dict], List[Key]]  # see file_rows


def _population(agg: Aggregator) -> Optional[dict]:
    """When the population tracepoints ran: the whole run ("always"), or
    only in the windows an update held ("update"; off 0 = still on at the end)."""
    maps = agg.maps or {}
    if not maps.get("population_attached"):
        return None
    if maps.get("population_policy") != "update":
        return {"policy": "always", "windows_ns": None}
    return {"policy": "update", "windows_ns": [[on - agg.base, off - agg.base if off else None]
                                               for on, off in maps.get("population_windows", [])]}


def file_rows(agg: Aggregator) -> Rows:
    """(file key, report row) of every file in order of appearance, the
    merged folio rows, and the files a retrieve created (shown on their
    original's row)."""
    maps = agg.maps or {}
    folio_rows = _merge_ser_rows(agg, maps.get("folio_stats", []))
    pops = _index(maps.get("population", []))
    hists: Dict[Tuple[int, int, int], Dict[int, int]] = {}
    for r in maps.get("folio_hist", []):
        hists.setdefault((r["handler"], r["dev"], r["ino"]), {})[r["slot"]] = r["count"]
    retrieved_inodes = {st.retrieved_inode for st in agg.files.values() if st.retrieved_inode}
    rows, created = [], []
    for key, st in agg.files.items():
        if st.result == "none" and key[2] in retrieved_inodes:
            created.append(key)
            continue
        rows.append((key, _file_json(st, agg, folio_rows.get(key), pops.get(key), hists.get(key, {}))))
    return rows, folio_rows, created


def retire(agg: Aggregator, keep: int, rows: Optional[Rows] = None) -> List[Key]:
    """Fold the rows of finished files, all but the KEEP most recent, into
    ``agg.retired`` and forget them; likewise sessions whose files are all
    gone.  Returns the BPF map keys of what was forgotten (the files and
    their serialized-data handles), for the caller to delete.  This is what
    keeps a long-running serve's memory and scrape time flat.  ROWS: those
    ``file_rows(agg)`` gave for the report just built, if any (not built twice)."""
    keyed, _folio, created = rows or file_rows(agg)
    done = [(k, r) for k, r in keyed if r["result"] in FINAL_RESULTS and not r["in_progress"]]
    old = done[: max(0, len(done) - keep)]
    if not old:
        return []
    t = Totals.from_json(agg.retired)
    for _k, r in old:
        t.add_file(r)
    gone = {k for k, _r in old}
    inodes = {agg.files[k].retrieved_inode for k in gone if agg.files[k].retrieved_inode}
    gone |= {k for k in created if k[2] in inodes}
    map_keys = sorted(gone) + [(h, SER_DEV, ser) for (h, ser), k in agg.ser_map.items() if k in gone]
    agg.forget(sorted(gone))
    alive = []
    recent = {id(x) for x in agg.all_sessions[-keep:]} if keep else set()
    for sess in agg.all_sessions:
        if not sess.files and id(sess) not in recent:
            t.add_session({"blackout_ns": sess.freeze_ns})
            agg.retired_sessions += 1
            if agg.sessions.get(sess.handle) is sess:
                del agg.sessions[sess.handle]
        else:
            alive.append(sess)
    agg.all_sessions = alive
    agg.retired = t.to_json()
    agg.retired_files += len(old)
    return map_keys


def build(agg: Aggregator, header: dict, end: Optional[dict], truncated: bool = False,
          truncated_reason: str = "", damaged: Sequence[str] = (), damaged_records: int = 0,
          rows: Optional[Rows] = None) -> dict:
    """DAMAGED: the recording's chunks skipped because their checksum failed.
    ROWS: ``file_rows(agg)``, when the caller needs them too."""
    maps = agg.maps or {}
    keyed, folio_rows, _created = rows or file_rows(agg)
    files = [r for _k, r in keyed]
    unattributed = folio_rows.get((HANDLERS["kho"], 0, 0))
    all_anoms = [{"handler": f["handler"], "inode": f["inode"], **a} for f in files for a in f["anomalies"]]
    sessions = []
    for s in agg.all_sessions:
        sessions.append({"id": s.id, "handle": s.handle, "files": [k[2] for k in s.files],
                         "blackout_start_ns": None if s.freeze_start is None else s.freeze_start - agg.base,
                         "blackout_ns": s.freeze_ns, "freeze_errno": errno_name(s.freeze_ret or 0),
                         "cancelled": s.cancelled})
    counters = maps.get("counters", {})
    end = end or {}
    bpf = end.get("bpf", {})
    preserved = [f for f in files if f["result"] not in ("none",)]
    totals = {
        "files": len(preserved),
        "files_by_result": _count(f["result"] for f in preserved),
        "folios_preserved": sum(f["folios_preserved"] or 0 for f in preserved),
        "bytes_preserved": sum((f["size_bytes"] or 0) for f in preserved if f["result"] in ("ok", "retrieved",
                                                                                          "discarded")),
        "anomalies": _count(a["code"] for a in all_anoms),
        "unattributed_folio_calls": (unattributed or {}).get("preserved", 0),
    }
    if agg.retired_files:  # a long-running serve: older finished files live on as totals
        old = Totals.from_json(agg.retired)
        totals["files"] += agg.retired_files
        for (_h, result), n in old.files.items():
            totals["files_by_result"][result] = totals["files_by_result"].get(result, 0) + n
        totals["files_by_result"] = dict(sorted(totals["files_by_result"].items()))
        totals["folios_preserved"] += sum(old.counters["folios_preserved"].values())
        totals["bytes_preserved"] += sum(old.counters["bytes_preserved"].values())
        for (_h, code), n in old.anomalies.items():
            totals["anomalies"][code] = totals["anomalies"].get(code, 0) + n
    gmem = _gmem(header)
    if gmem and gmem["not_checked"] and agg.mode != "light":  # light mode lists them for every file already
        for f in files:
            if f["handler"] == "guest_memfd":
                f["anomalies_not_checked"] = sorted({*f.get("anomalies_not_checked", []), *gmem["not_checked"]})
    return {
        "schema": SCHEMA,
        "recording": {k: header.get(k) for k in ("kernel", "hostname", "mode", "target", "labels", "started")},
        "gmem": gmem,
        "truncated": truncated,
        "truncated_reason": truncated_reason or None,
        "damaged": list(damaged),
        "files": files,
        "sessions": sessions,
        "anomalies": all_anoms,
        "anomalies_not_checked": list(anomalies.NEEDS_FOLIO_MODE) if agg.mode == "light" else [],
        "population": _population(agg),
        # folio mode: "array" (each file's serialized folio array) or "calls"
        # (a program per kho_preserve_folio: trace mode, --folio-latency)
        "folio_source": (agg.maps or {}).get("folio_source", "calls") if agg.mode != "light" else None,
        "totals": totals,
        "probes": [probe_row(p) for p in header.get("probes", [])],
        "layout_unknown": header.get("layout", {}).get("unknown", {}),
        "events": {"received": agg.received,
                   "lost": int(counters.get("lost", 0)) + int(counters.get("folio_lost", 0)),
                   "lost_lifecycle": int(counters.get("lost", 0)),
                   "lost_per_folio": int(counters.get("folio_lost", 0)),
                   "sampled_out": int(counters.get("sampled_out", 0)),
                   "inflight_dropped": int(counters.get("inflight_full", 0)),
                   "map_full": int(counters.get("map_full", 0)),
                   "unknown_key": agg.unknown_key,
                   "damaged": damaged_records,
                   "untracked": agg.untracked_events},
        "untracked_files": agg.untracked_files,
        "update": _update(header, agg),
        "kexec_ns": [t - agg.base for t in agg.kexec_ts],
        "files_finished": [[HANDLER_NAMES.get(h, "unknown"), r, n] for (h, r), n in sorted(agg.finished.items())],
        "retired": {"files": agg.retired_files, "sessions": agg.retired_sessions, "totals": agg.retired},
        "bpf": {"run_time_ns": int(bpf.get("run_time_ns", 0)), "run_cnt": int(bpf.get("run_cnt", 0)),
                "missed": int(bpf.get("missed", 0)),
                "stats_enabled": bool(bpf.get("stats_enabled", False)),
                "programs": {k: {"run_time_ns": int(v.get("run_time_ns", 0)), "run_cnt": int(v.get("run_cnt", 0)),
                                 **({"missed": int(v["recursion_misses"])} if v.get("recursion_misses") else {})}
                             for k, v in sorted((bpf.get("programs") or {}).items())}},
        "duration_ns": end.get("duration_ns"),
    }


# Checks a stand-in guest_memfd file cannot answer, and why (report "gmem").
STANDIN_NOT_CHECKED = {"large_folios": "a stand-in (ramfs) makes only order-0 folios, where a guest_memfd "
                                       "with huge pages makes large ones"}


def _gmem(header: dict) -> Optional[dict]:
    """What the guest_memfd files were (real, or stand-ins and why); None
    for a recording made before luotrace said."""
    g = header.get("gmem")
    if not g:
        return None
    standin = g["backing"] == "standin"
    return {"backing": g["backing"], "why": g.get("why"), "dev": g.get("dev"),
            "not_checked": dict(STANDIN_NOT_CHECKED) if standin else {}}


def _update(header: dict, agg: Aggregator) -> dict:
    """The boot traced, and the wall-clock time of the last kexec seen (from
    the recording's clock anchor: base realtime + monotonic since base)."""
    ck = header.get("clock") or {}
    last = None
    if agg.kexec_ts and "base_realtime_ns" in ck and "base_monotonic_ns" in ck:
        last = ck["base_realtime_ns"] + agg.kexec_ts[-1] - ck["base_monotonic_ns"]
    return {"boot_id": ck.get("boot_id"), "last_kexec_realtime_ns": last}


def probe_row(p: dict) -> dict:
    """A probe's status as the report shows it, from a recording header's entry."""
    return {"symbol": p["symbol"], "name": p["name"], "handler": p["handler"], "required": bool(p.get("required")),
            "strategy": p["strategy"], "status": p["status"], "reason": p.get("reason") or None}


def _count(items) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))
