"""Terminal rendering of a report (tracer/analysis/report.py): one table row per file,
then sessions, anomalies with their evidence, probes and event accounting."""
from __future__ import annotations

from typing import Dict, List, Optional

from tracer.probes.catalog import LEAF_PHASES
from tracer.base.printable import printable

PHASE_COLUMNS = [p for p in LEAF_PHASES if p != "can_preserve"]


def fmt_ns(ns: Optional[int]) -> str:
    if ns is None:
        return "-"
    if ns < 10_000:
        return f"{ns}ns"
    if ns < 10_000_000:
        return f"{ns / 1e3:.1f}us"
    if ns < 10_000_000_000:
        return f"{ns / 1e6:.1f}ms"
    return f"{ns / 1e9:.2f}s"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            return f"{n / (1 << shift):g}{unit}"
    return f"{n}B"


def _v(x) -> str:
    return "-" if x is None else str(x)


def _table(rows: List[List[str]], header: List[str]) -> List[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    def line(r: List[str]) -> str:
        return "  ".join(c.rjust(w) if i and c[:1].isdigit() else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


# why a rule could not run on one file (its report row's anomalies_not_checked)
NOT_CHECKED_WHY = {"unwind_incomplete": "a failed preserve's unwind hands no folio array back, or a cancel's "
                                         "preserve was not read whole: folios given back unknown",
                   "pfn_zero": "a page of its folio array could not be read"}


def render(report: dict) -> str:
    out: List[str] = []
    rec = report.get("recording", {})
    out.append(f"luotrace report  kernel {rec.get('kernel')}  host {rec.get('hostname')}  mode {rec.get('mode')}"
               f"  target {rec.get('target')}")
    if rec.get("labels"):
        out.append("labels: " + ", ".join(f"{k}={v}" for k, v in sorted(rec["labels"].items())))
    gmem = report.get("gmem")
    if gmem and gmem["backing"] == "standin":
        dev = gmem.get("dev")
        where = f", dev {dev >> 20}:{dev & 0xFFFFF}" if dev is not None else ""
        out.append(f"guest_memfd files: STAND-INS (ramfs page-cache files{where}), not guest_memfds: {gmem.get('why')}")
    if report.get("truncated"):
        out.append(f"WARNING: recording truncated ({report.get('truncated_reason')}); "
                   "showing every complete record")
    if report.get("damaged"):
        n = (report.get("events") or {}).get("damaged", 0)
        out.append(f"WARNING: {len(report['damaged'])} damaged part(s) skipped, checksum failed"
                   + (f", {n} event records not used" if n else "") + ": " + "; ".join(report["damaged"][:4]))
    for i, b in enumerate(report.get("boots", [])):
        out.append(f"boot {i + 1}: kernel {b['kernel']}  {b['recording']}  ended by {b['ended_by']}"
                   + (f"  clock +{fmt_ns(b['clock_offset_ns'])} ({b['joined_by']})" if i else ""))
    if report.get("boots"):
        out.append("kexec at " + (", ".join(fmt_ns(k) for k in report.get("kexec_ns", [])) or "- (not seen)"))
    out.append("")
    files = report.get("files", [])
    joined = "boots" in report
    present = [p for p in PHASE_COLUMNS if any(ph["name"] == p for f in files for ph in f["phases"])]
    rows = []
    for f in files:
        durs: Dict[str, int] = {}
        for ph in f["phases"]:
            durs[ph["name"]] = durs.get(ph["name"], 0) + ph["duration_ns"]
        rows.append([f["handler"], str(f["inode"]), _v(f["session"]), fmt_bytes(f["size_bytes"]),
                     _v(f["folios_populated"]), _v(f["folios_preserved"]), _v(f["folios_unpreserved"]),
                     f["result"] + (f" {f['errno']}" if f["errno"] else ""),
                     fmt_ns(f["preserve"]["duration_ns"]) if f["preserve"] else "-"]
                    + [fmt_ns(durs.get(p)) if p in durs else "-" for p in present]
                    + ([_v(f["folios_restored"]), fmt_ns(f.get("blackout_ns"))] if joined else [])
                    + [",".join(a["code"] for a in f["anomalies"]) or "-"])
    if rows:
        out += _table(rows, ["handler", "inode", "sess", "size", "populated", "preserved", "unpreserved",
                             "result", "preserve"] + present + (["restored", "blackout"] if joined else [])
                      + ["anomalies"])
    else:
        out.append("no files seen")
    sessions = report.get("sessions", [])
    if sessions:
        out.append("")
        out.append("sessions: " + "; ".join(
            f"#{s['id']} files {len(s['files'])} blackout "
            + (fmt_ns(s["blackout_ns"]) if s["blackout_ns"] is not None or s["blackout_start_ns"] is None
               else "(freeze started, cut by the jump)")
            + (" cancelled" if s["cancelled"] else "") for s in sessions))
    anoms = report.get("anomalies", [])
    out.append("")
    if anoms:
        out.append(f"anomalies ({len(anoms)}):")
        for a in anoms:
            out.append(f"  {a['code']:<26} {a['handler']} inode {a['inode']}: {a['detail']}")
    else:
        out.append("anomalies: none")
    if report.get("anomalies_not_checked"):
        out.append("  not checked in light mode: " + ", ".join(report["anomalies_not_checked"]))
    standin = (report.get("gmem") or {}).get("not_checked") or {}
    if standin and any(f["handler"] == "guest_memfd" for f in report.get("files", [])):
        out.append("  not checked on the stand-in guest_memfd files: "
                   + "; ".join(f"{c} ({why})" for c, why in standin.items()))
    for f in report.get("files", []):
        codes = [c for c in f.get("anomalies_not_checked", []) if c not in standin]
        if codes:  # folio arrays: a failed preserve's unwind is not counted
            out.append(f"  not checked on {f['handler']} inode {f['inode']}: "
                       + "; ".join(f"{c} ({NOT_CHECKED_WHY.get(c, 'unknown')})" for c in codes)
                       + "; --folio-latency checks it")
    t = report.get("totals", {})
    out.append("")
    by_result = ", ".join(f"{k} {v}" for k, v in t.get("files_by_result", {}).items()) or "-"
    out.append(f"totals: {t.get('files', 0)} files ({by_result}),"
               f" {t.get('folios_preserved', 0)} folios preserved, {fmt_bytes(t.get('bytes_preserved', 0))} kept")
    retired = report.get("retired") or {}
    if retired.get("files"):
        out.append(f"  of which {retired['files']} older finished files are kept as totals only (serve --keep-files)")
    if report.get("untracked_files"):
        out.append(f"WARNING: {report['untracked_files']} more files were counted, not followed: luotrace follows "
                   f"at most {len(report.get('files', []))} files per report")
    probes = report.get("probes", [])
    att = [p for p in probes if p["status"] == "attached"]
    strategies = sorted({p["strategy"] for p in att})
    out.append(f"probes: {len(att)}/{len(probes)} attached ({', '.join(strategies) or 'none'})")
    for p in probes:
        if p["status"] != "attached":
            out.append(f"  {p['symbol']}: {p['status']}" + (f" ({p['reason']})" if p.get("reason") else ""))
    ev = report.get("events", {})
    bpf = report.get("bpf", {})
    out.append(f"events: {ev.get('received', 0)} received, {ev.get('lost', 0)} lost"
               + (f" ({ev['lost_lifecycle']} lifecycle)" if ev.get("lost_lifecycle") else "")
               + (f", {ev['sampled_out']} sampled out" if ev.get("sampled_out") else "")
               + (f", {ev['inflight_dropped']} calls untracked (inflight map full)" if ev.get("inflight_dropped") else "")
               + (f", {ev['map_full']} per-file updates dropped (map full: raise the bound)" if ev.get("map_full") else ""))
    if bpf.get("run_cnt"):
        out.append(f"tracer cost: {bpf['run_cnt']} BPF runs, {fmt_ns(bpf['run_time_ns'])} total, "
                   f"{bpf['run_time_ns'] / bpf['run_cnt']:.0f}ns each")
    if bpf.get("missed"):
        progs = ", ".join(f"{k} {v['missed']}" for k, v in (bpf.get("programs") or {}).items() if v.get("missed"))
        out.append(f"WARNING: the kernel skipped {bpf['missed']} runs of luotrace's programs ({progs}): that CPU "
                   "was inside BPF already (another tool's program, or a BPF map syscall preempted there); "
                   "what those programs count may be short")
    return "\n".join(printable(line) for line in out) + "\n"
