"""Prometheus exposition of luotrace's state: a custom collector that builds
every metric family at scrape time from a snapshot (the report of the live
run, with the BPF maps read just now, or of a recording).  No Python work per
kernel event: counters come from BPF map counts, histograms from the
in-kernel log2 buckets.

Metric names are a contract: dashboards/ and the rules use only names listed
in METRICS, and tests/test_prometheus.py checks it against a real Prometheus.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway

from prometheus_client.core import Metric, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from tracer import __version__
from tracer.analysis.aggregator import FINAL_RESULTS
from tracer.probes.catalog import BY_NAME
from tracer.analysis.replay import replay
from tracer.analysis.totals import BUCKETS_S, HANDLERS, NBUCKETS, OUTCOMES, PHASES, Totals
from tracer.base.errors import LuotraceError
from tracer.base.output import check_output

TOP_FILES = 16  # per-file series only for the largest files
# Series a host exports with the defaults, whatever the number of files (every
# catalog probe, both handlers, all results, 16 largest files, a few errnos and
# anomaly kinds); tests/test_prometheus.py holds it to this.
SERIES_BUDGET = 300

METRICS: Dict[str, str] = {
    "luotrace_preserve_duration_seconds": "histogram",
    "luotrace_phase_duration_seconds": "summary",
    "luotrace_folio_preserve_duration_seconds": "histogram",
    "luotrace_blackout_duration_seconds": "histogram",
    "luotrace_folios_preserved_total": "counter",
    "luotrace_folios_unpreserved_total": "counter",
    "luotrace_folios_restored_total": "counter",
    "luotrace_folios_populated_total": "counter",
    "luotrace_bytes_preserved_total": "counter",
    "luotrace_files_total": "counter",
    "luotrace_preserve_errors_total": "counter",
    "luotrace_anomalies_total": "counter",
    "luotrace_events_total": "counter",
    "luotrace_events_lost_total": "counter",
    "luotrace_probe_attached": "gauge",
    "luotrace_bpf_run_time_seconds_total": "counter",
    "luotrace_bpf_runs_total": "counter",
    "luotrace_bpf_runs_missed_total": "counter",
    "luotrace_build_info": "gauge",
    "luotrace_file_size_bytes": "gauge",
    "luotrace_file_preserve_duration_seconds": "gauge",
    "luotrace_files_tracked": "gauge",
    "luotrace_files_current": "gauge",
    "luotrace_update_info": "gauge",
    "luotrace_last_update_timestamp_seconds": "gauge",
    "luotrace_tracing": "gauge",
}



def exported_series_names() -> List[str]:
    """Every series name a scrape can contain (histograms expand)."""
    out = []
    for name, kind in METRICS.items():
        if kind == "histogram":
            out += [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
        elif kind == "summary":
            out += [f"{name}_sum", f"{name}_count"]
        else:
            out.append(name)  # a counter's name already ends in _total
    return out


def _cumulative(counts: List[int]) -> List[Tuple[str, float]]:
    out: List[Tuple[str, float]] = []
    acc = 0
    for i, c in enumerate(counts[:-1]):
        acc += c
        out.append((repr(BUCKETS_S[i]), acc))
    out.append(("+Inf", acc + counts[-1]))
    return out


def _hist_family(name: str, doc: str, labels: List[str], data: Dict[Tuple[str, ...], Tuple[List[int], float]],
                 always: Iterable[Tuple[str, ...]] = ()) -> HistogramMetricFamily:
    """Every bucket of every label set is emitted; ALWAYS label sets exist even at zero."""
    fam = HistogramMetricFamily(name, doc, labels=labels)
    rows = dict(data)
    for labels_ in always:
        rows.setdefault(labels_, ([0] * NBUCKETS, 0.0))
    for labels_, (counts, s) in sorted(rows.items()):
        fam.add_metric(list(labels_), _cumulative(counts), s)
    return fam


class LuotraceCollector(Collector):
    """Reads ``snapshot()`` (a luotrace report dict) at every scrape, and adds
    ``earlier()``: families of earlier boots' updates (earlier_boot_families)."""

    def __init__(self, snapshot: Callable[[], dict], registry=None, per_program: bool = False,
                 earlier: Callable[[], List[Metric]] = lambda: [], tracing: Callable[[], bool] = lambda: False):
        self._snapshot = snapshot
        self._per_program = per_program
        self._earlier = earlier
        self._tracing = tracing
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterator:
        return iter(())  # families depend on the snapshot; registered unchecked

    def collect(self) -> Iterator:
        rep = self._snapshot()
        yield GaugeMetricFamily("luotrace_tracing", "1 while every selected probe is attached and luotrace is "
                                "watching; 0 while it starts, detaches, or serves a final state or a recording",
                                value=1 if self._tracing() else 0)
        yield from merged(families(rep, self._per_program), self._earlier())


# What an earlier boot's recording adds: the numbers of the update that ended
# it (counters, histograms, its identity), not the tracer's state then (gauges
# of the moment, probes, BPF cost, per-folio latency: in its recording), and
# only series that are not zero.
EARLIER_BOOT_SKIP = ("luotrace_bpf_run_time_seconds", "luotrace_bpf_runs", "luotrace_bpf_runs_missed",
                     "luotrace_events", "luotrace_folio_preserve_duration_seconds")
EARLIER_BOOT_BUDGET = 110  # series one earlier boot adds at most (tests/test_prometheus.py holds it to this)


def earlier_boot_families(rep: dict) -> List[Metric]:
    """REP's update as families whose samples carry ``boot_id`` and ``kernel``
    (the boot and kernel that ran it), to be exported beside the live ones."""
    rec, upd = rep.get("recording") or {}, rep.get("update") or {}
    extra = {"boot_id": str(upd.get("boot_id") or "unknown"), "kernel": str(rec.get("kernel") or "unknown")}
    out: List[Metric] = []
    for fam in families(rep):
        if fam.name == "luotrace_update_info":
            out.append(fam)  # already labelled with its boot and kernel
            continue
        if fam.name == "luotrace_last_update_timestamp_seconds" or \
                (fam.type in ("counter", "histogram", "summary") and fam.name not in EARLIER_BOOT_SKIP):
            zero = {_labelset(s) for s in fam.samples
                    if s.value == 0 and (fam.type not in ("histogram", "summary") or s.name.endswith("_count"))}
            m = Metric(fam.name, fam.documentation, fam.type)
            m.samples = [s._replace(labels={**s.labels, **extra}) for s in fam.samples if _labelset(s) not in zero]
            if m.samples:
                out.append(m)
    return out


def _labelset(s) -> Tuple:
    return tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("le", "quantile")))


def merged(live: List[Metric], extra: List[Metric]) -> List[Metric]:
    """LIVE with EXTRA's samples added to the family of the same name (one
    family per name in an exposition); EXTRA is not modified."""
    by_name = {f.name: f for f in live}
    out = list(live)
    for fam in extra:
        if fam.name in by_name:
            by_name[fam.name].samples = by_name[fam.name].samples + fam.samples
        else:
            out.append(fam)
    return out


def _phase_family(t: Totals, rep: dict) -> SummaryMetricFamily:
    """Phase durations as a count and a sum per handler and phase (a summary
    without quantiles): what the time-per-phase panel needs, at 2 series a
    phase instead of 16.  Every phase starts at zero, but for an op the traced
    code does not have (absent: a revision dropped it), which has no series."""
    fam = SummaryMetricFamily("luotrace_phase_duration_seconds", "Duration of each preservation phase",
                              labels=["handler", "phase"])
    absent = {(p["handler"], BY_NAME[p["name"]].role) for p in rep.get("probes", [])
              if p.get("status") == "absent" and p.get("name") in BY_NAME}
    data = dict(t.hists["phase"])
    for h, phases in PHASES.items():
        for p in phases:
            if (h, p) not in absent:
                data.setdefault((h, p), ([0] * NBUCKETS, 0.0))
    for labels, (counts, s) in sorted(data.items()):
        fam.add_metric(list(labels), count_value=sum(counts), sum_value=s)
    return fam


IDENTITY = ("kernel", "boot_id", "host")


def _identity(rep: dict) -> List:
    """Which update these numbers are of: kernel, boot and host, and the
    recording's labels (`--label patch=v3`), as an info metric; the wall-clock
    time of the last kexec seen, when one was."""
    rec = rep.get("recording") or {}
    upd = rep.get("update") or {}
    labels = {"kernel": str(rec.get("kernel")), "boot_id": str(upd.get("boot_id") or ""),
              "host": str(rec.get("hostname") or "")}
    for k, v in sorted((rec.get("labels") or {}).items()):
        labels[f"label_{k}" if k in IDENTITY else k] = str(v)
    info = GaugeMetricFamily("luotrace_update_info", "The traced kernel, boot and host, and the recording's "
                             "labels (value 1)", labels=list(labels))
    info.add_metric(list(labels.values()), 1)
    out = [info]
    if upd.get("last_kexec_realtime_ns"):
        out.append(GaugeMetricFamily("luotrace_last_update_timestamp_seconds",
                                     "Wall-clock time of the last kexec (the jump to the next kernel) seen",
                                     value=upd["last_kexec_realtime_ns"] / 1e9))
    return out


def families(rep: dict, per_program: bool = False) -> List:
    """Every family, every label set that can appear initialised at zero (a
    rate() sees the first update).  PER_PROGRAM: the BPF cost per program
    (`--bpf-stats`), else one total: 50 series a host does not need daily."""
    files = rep.get("files", [])
    mode = (rep.get("recording") or {}).get("mode") or "unknown"
    out: List = []

    info = GaugeMetricFamily("luotrace_build_info", "luotrace version, traced kernel, boot, mode and what the "
                             "guest_memfd files are (gmem: guest_memfd, or standin where the host's KVM makes "
                             "none; value 1)", labels=["version", "kernel", "boot_id", "mode", "gmem"])
    info.add_metric([__version__, str((rep.get("recording") or {}).get("kernel")),
                     str((rep.get("update") or {}).get("boot_id") or ""), mode,
                     str((rep.get("gmem") or {}).get("backing") or "")], 1)
    out.append(info)
    out += _identity(rep)

    t = Totals.of_report(rep)
    for k, doc in (
        ("folios_preserved", "Folios preserved (successful kho_preserve_folio)"),
        ("folios_unpreserved", "Folios released again by unwind or cancel (kho_unpreserve_folio)"),
        ("folios_restored", "Folios taken back by retrieve or discard (kho_restore_folio)"),
        ("folios_populated", "Folios added to guest_memfd page caches (filemap tracepoint)"),
        ("bytes_preserved", "Bytes of files preserved successfully"),
    ):
        fam = CounterMetricFamily(f"luotrace_{k}", doc, labels=["handler"])
        for h in HANDLERS:
            fam.add_metric([h], t.counters[k].get(h, 0))
        out.append(fam)
    out += [
        _hist_family("luotrace_preserve_duration_seconds", "Duration of each file's preserve call, by outcome",
                     ["handler", "result"], t.hists["preserve"], always=[(h, o) for h in HANDLERS for o in OUTCOMES]),
        _phase_family(t, rep),
        _hist_family("luotrace_folio_preserve_duration_seconds",
                     "Latency of kho_preserve_folio, from the in-kernel log2 histogram", ["handler"],
                     t.hists["folio"], always=[(h,) for h in HANDLERS]),  # stable series before any file
    ]
    finished = CounterMetricFamily("luotrace_files", "Files that reached a final result (each time they did)",
                                   labels=["handler", "result"])
    done = {(h, r): n for h, r, n in rep.get("files_finished", [])}
    for h in HANDLERS:
        for r in FINAL_RESULTS:
            finished.add_metric([h, r], done.get((h, r), 0))
    out.append(finished)
    current = GaugeMetricFamily("luotrace_files_current", "Files held now, by their current state (ok: preserved, "
                                "waiting for the kexec)", labels=["handler", "state"])
    now: Dict[Tuple[str, str], int] = {}
    for f in files:
        if f["result"] != "none":
            now[(f["handler"], f["result"])] = now.get((f["handler"], f["result"]), 0) + 1
    for h in HANDLERS:
        for r in ("ok",) + FINAL_RESULTS:
            current.add_metric([h, r], now.get((h, r), 0))
    out.append(current)
    for name, doc, labels, data in (
            ("luotrace_preserve_errors", "Files whose preservation failed, by errno", ["handler", "errno"], t.errors),
            ("luotrace_anomalies", "Anomalies found (see the report for evidence), by kind", ["handler", "kind"],
             t.anomalies)):
        fam = CounterMetricFamily(name, doc, labels=labels)
        for key, n in sorted(data.items()):
            fam.add_metric(list(key), n)
        out.append(fam)
    out.append(_hist_family("luotrace_blackout_duration_seconds",
                            "LUO freeze span of each session (inside the blackout)", [], t.hists["blackout"],
                            always=[()]))

    ev = rep.get("events", {})
    out.append(CounterMetricFamily("luotrace_events", "Event records received from the kernel",
                                   value=ev.get("received", 0)))
    out.append(CounterMetricFamily("luotrace_events_lost", "Event records lost (ring buffer full), counted in BPF",
                                   value=ev.get("lost", 0)))
    att = GaugeMetricFamily("luotrace_probe_attached", "1 if the probe is attached, with its strategy",
                            labels=["probe", "strategy", "required"])
    for p in rep.get("probes", []):
        att.add_metric([p["symbol"], p["strategy"], "true" if p.get("required") else "false"],
                       1 if p["status"] == "attached" else 0)
    out.append(att)
    bpf = rep.get("bpf") or {}
    doc = "Time spent in luotrace's BPF programs (BPF_ENABLE_STATS): the tracer's own cost"
    if per_program:
        rt = CounterMetricFamily("luotrace_bpf_run_time_seconds", doc, labels=["program"])
        rc = CounterMetricFamily("luotrace_bpf_runs", "Runs of luotrace's BPF programs", labels=["program"])
        for prog, st in sorted((bpf.get("programs") or {}).items()):
            rt.add_metric([prog], st.get("run_time_ns", 0) / 1e9)
            rc.add_metric([prog], st.get("run_cnt", 0))
    else:
        rt = CounterMetricFamily("luotrace_bpf_run_time_seconds", doc, value=bpf.get("run_time_ns", 0) / 1e9)
        rc = CounterMetricFamily("luotrace_bpf_runs", "Runs of luotrace's BPF programs", value=bpf.get("run_cnt", 0))
    out += [rt, rc, CounterMetricFamily(
        "luotrace_bpf_runs_missed", "Runs of luotrace's BPF programs the kernel skipped (recursion_misses: the CPU "
        "was inside BPF already); what those programs count may be short", value=bpf.get("missed", 0))]

    tracked = GaugeMetricFamily("luotrace_files_tracked", "Files held in detail now (finished ones bounded by "
                                "serve --keep-files; older ones live on in the counters)")
    tracked.add_metric([], len(files))
    out.append(tracked)
    top = sorted((f for f in files if f["result"] != "none" and f.get("size_bytes")),
                 key=lambda f: (-f["size_bytes"], f["inode"]))[:TOP_FILES]
    size = GaugeMetricFamily("luotrace_file_size_bytes", f"Size of the {TOP_FILES} largest preserved files",
                             labels=["handler", "inode"])
    dur = GaugeMetricFamily("luotrace_file_preserve_duration_seconds",
                            f"Preserve duration of the {TOP_FILES} largest preserved files", labels=["handler", "inode"])
    for f in top:
        size.add_metric([f["handler"], str(f["inode"])], f["size_bytes"])
        if f.get("preserve"):
            dur.add_metric([f["handler"], str(f["inode"])], f["preserve"]["duration_ns"] / 1e9)
    out += [size, dur]
    return out


def exposition(rep: dict, per_program: bool = False) -> str:
    """The text exposition `luotrace serve` would give for this report."""
    return generate_latest(_registry(rep, per_program)).decode()


def _registry(rep: dict, per_program: bool) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    LuotraceCollector(lambda: rep, registry=registry, per_program=per_program)
    return registry


TEXTFILE = "luotrace.prom"


def write_textfile(directory: str, rep: dict, per_program: bool = False) -> str:
    """REP's metrics as DIRECTORY/luotrace.prom for node_exporter's textfile
    collector (see write_textfile_at)."""
    path = os.path.join(directory, TEXTFILE)
    write_textfile_at(path, rep, per_program)
    return path


def write_textfile_at(path: str, rep: dict, per_program: bool = False) -> None:
    """REP's metrics at PATH, written to a temporary file, fsynced, renamed
    over the old one and the directory fsynced, so that a kexec a moment
    later finds the whole file on disk or the previous one, never half of it."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}.tmp"  # node_exporter reads *.prom only
    data = exposition(rep, per_program).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def push(gateway: str, rep: dict, per_program: bool = False, timeout: float = 3.0) -> None:
    """REP's metrics to a Pushgateway, grouped by host and boot id so that
    each boot's numbers stay apart (job "luotrace")."""
    rec = rep.get("recording") or {}
    grouping = {"host": str(rec.get("hostname") or "unknown"),
                "boot_id": str((rep.get("update") or {}).get("boot_id") or "unknown")}
    push_to_gateway(gateway, job="luotrace", registry=_registry(rep, per_program), grouping_key=grouping,
                    timeout=timeout)


SUMMARY_SKIP = ("_bucket", "luotrace_bpf_", "luotrace_probe_attached", "luotrace_file_", "luotrace_phase_")


def summary(rep: dict) -> str:
    """The headline samples of the exposition, for the terminal (no buckets,
    per-program or per-probe series, nothing that is zero)."""
    lines = []
    for line in exposition(rep).splitlines():
        if not line or line.startswith("#") or any(s in line for s in SUMMARY_SKIP):
            continue
        if line.rsplit(" ", 1)[-1] in ("0.0", "0"):
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def export_textfile(path: str, out: str, per_program: bool = False) -> None:
    """node_exporter textfile-collector format, written atomically (a
    temporary file renamed over OUT): so OUT must be a regular file or none,
    never a device or FIFO a rename would replace."""
    check_output(out, force=True, what="textfile")
    report = replay(path)
    try:
        write_textfile_at(out, report, per_program)
    except OSError as e:
        raise LuotraceError(f"cannot write {out}: {e.strerror}", "choose a writable path") from None
