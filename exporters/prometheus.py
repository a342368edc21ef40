"""Prometheus exposition of luotrace's state: a custom collector that builds
every metric family at scrape time from a snapshot (the report of the live
run, with the BPF maps read just now, or of a recording).  No Python work per
kernel event: counters come from BPF map counts, histograms from the
in-kernel log2 buckets.

Metric names are a contract: dashboards/ and the rules use only names listed
in METRICS, and tests/test_prometheus.py checks it against a real Prometheus.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tracer import __version__

# Histogram bounds: powers of two nanoseconds, 2^10 ns (~1 us) .. 2^36 ns (~69 s),
# expressed in seconds.  The in-kernel log2 slot s holds values in
# [2^(s-1), 2^s - 1] ns (bcc's bpf_log2l), so it lands in the bucket le=2^s ns.
LOG2_MIN, LOG2_MAX = 10, 36
BUCKETS_S = [2 ** k / 1e9 for k in range(LOG2_MIN, LOG2_MAX + 1)]
TOP_FILES = 16  # per-file series only for the largest files

METRICS: Dict[str, str] = {
    "luotrace_preserve_duration_seconds": "histogram",
    "luotrace_phase_duration_seconds": "histogram",
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
    "luotrace_build_info": "gauge",
    "luotrace_file_size_bytes": "gauge",
    "luotrace_file_preserve_duration_seconds": "gauge",
}

HANDLERS = ("guest_memfd", "memfd")


def exported_series_names() -> List[str]:
    """Every series name a scrape can contain (histograms expand)."""
    out = []
    for name, kind in METRICS.items():
        if kind == "histogram":
            out += [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
        elif kind == "counter":
            out.append(name)  # already ends in _total
        else:
            out.append(name)
    return out


def _log2_buckets_from_ns(values_ns: Iterable[int]) -> Tuple[List[int], int, int]:
    """Observations (ns) -> per-bucket counts on BUCKETS_S, count, sum."""
    counts = [0] * (len(BUCKETS_S) + 1)
    n = total = 0
    for v in values_ns:
        n += 1
        total += v
        counts[_bucket_index_ns(v)] += 1
    return counts, n, total


def _bucket_index_ns(v: int) -> int:
    k = max(int(v).bit_length(), LOG2_MIN)  # smallest k with v < 2^k
    return min(k - LOG2_MIN, len(BUCKETS_S))


def _slot_counts(slots: Dict[int, int]) -> List[int]:
    """In-kernel log2 slots -> per-bucket counts on BUCKETS_S (slot s <= 2^s - 1 ns)."""
    counts = [0] * (len(BUCKETS_S) + 1)
    for slot, c in slots.items():
        counts[min(max(int(slot), LOG2_MIN) - LOG2_MIN, len(BUCKETS_S))] += c
    return counts


def _cumulative(counts: List[int]) -> List[Tuple[str, float]]:
    out, acc = [], 0
    for i, c in enumerate(counts[:-1]):
        acc += c
        out.append((repr(BUCKETS_S[i]), acc))
    out.append(("+Inf", acc + counts[-1]))
    return out


class _Hist:
    """Accumulates per-label bucket counts; every bucket is always emitted."""

    def __init__(self, name: str, doc: str, labels: List[str]):
        self.fam = HistogramMetricFamily(name, doc, labels=labels)
        self.data: Dict[Tuple[str, ...], Tuple[List[int], float]] = {}

    def add_counts(self, labels: Tuple[str, ...], counts: List[int], sum_s: float) -> None:
        cur, s = self.data.get(labels, ([0] * (len(BUCKETS_S) + 1), 0.0))
        self.data[labels] = ([a + b for a, b in zip(cur, counts)], s + sum_s)

    def observe_ns(self, labels: Tuple[str, ...], values: Iterable[int]) -> None:
        counts, _n, total = _log2_buckets_from_ns(values)
        self.add_counts(labels, counts, total / 1e9)

    def family(self) -> HistogramMetricFamily:
        for labels, (counts, s) in sorted(self.data.items()):
            self.fam.add_metric(list(labels), _cumulative(counts), s)
        return self.fam


class LuotraceCollector(Collector):
    """Reads ``snapshot()`` (a luotrace report dict) at every scrape."""

    def __init__(self, snapshot: Callable[[], dict], registry=None):
        self._snapshot = snapshot
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterator:
        return iter(())  # families depend on the snapshot; registered unchecked

    def collect(self) -> Iterator:
        rep = self._snapshot()
        yield from families(rep)


def families(rep: dict) -> List:
    files = rep.get("files", [])
    mode = (rep.get("recording") or {}).get("mode") or "unknown"
    out: List = []

    info = GaugeMetricFamily("luotrace_build_info", "luotrace version, traced kernel and mode (value 1)",
                             labels=["version", "kernel", "mode"])
    info.add_metric([__version__, str((rep.get("recording") or {}).get("kernel")), mode], 1)
    out.append(info)

    pres = _Hist("luotrace_preserve_duration_seconds", "Duration of each file's preserve call, by result",
                 ["handler", "result"])
    phase = _Hist("luotrace_phase_duration_seconds", "Duration of each preservation phase", ["handler", "phase"])
    folio = _Hist("luotrace_folio_preserve_duration_seconds",
                  "Latency of kho_preserve_folio, from the in-kernel log2 histogram", ["handler"])
    counters = {k: CounterMetricFamily(f"luotrace_{k}", doc, labels=["handler"]) for k, doc in (
        ("folios_preserved", "Folios preserved (successful kho_preserve_folio)"),
        ("folios_unpreserved", "Folios released again by unwind or cancel (kho_unpreserve_folio)"),
        ("folios_restored", "Folios taken back by retrieve or discard (kho_restore_folio)"),
        ("folios_populated", "Folios added to guest_memfd page caches (filemap tracepoint)"),
        ("bytes_preserved", "Bytes of files preserved successfully"),
    )}
    sums: Dict[str, Dict[str, int]] = {k: {h: 0 for h in HANDLERS} for k in counters}
    files_by: Dict[Tuple[str, str], int] = {}
    errors: Dict[Tuple[str, str], int] = {}
    anomalies: Dict[Tuple[str, str], int] = {}
    for f in files:
        h = f["handler"]
        if h not in HANDLERS:
            continue
        sums["folios_populated"][h] += f.get("folios_populated") or 0
        if f["result"] == "none":
            continue
        sums["folios_preserved"][h] += f.get("folios_preserved") or 0
        sums["folios_unpreserved"][h] += f.get("folios_unpreserved") or 0
        sums["folios_restored"][h] += (f.get("folios_restored") or 0) + (f.get("folios_discarded") or 0)
        if f["result"] in ("ok", "retrieved", "discarded"):
            sums["bytes_preserved"][h] += f.get("size_bytes") or 0
        files_by[(h, f["result"])] = files_by.get((h, f["result"]), 0) + 1
        if f.get("errno"):
            errors[(h, f["errno"])] = errors.get((h, f["errno"]), 0) + 1
        for a in f.get("anomalies", []):
            anomalies[(h, a["code"])] = anomalies.get((h, a["code"]), 0) + 1
        if f.get("preserve"):
            pres.observe_ns((h, f["result"]), [f["preserve"]["duration_ns"]])
        for p in f.get("phases", []):
            if p["name"] != "preserve":
                phase.observe_ns((h, p["name"]), [p["duration_ns"]])
        slots = f.get("folio_latency_log2_ns") or {}
        if slots:
            folio.add_counts((h,), _slot_counts({int(k): v for k, v in slots.items()}),
                             (f.get("folio_preserve_ns_total") or 0) / 1e9)
    for h in HANDLERS:  # stable series for both handlers even before any file
        folio.data.setdefault((h,), ([0] * (len(BUCKETS_S) + 1), 0.0))
    for k, fam in counters.items():
        for h in HANDLERS:
            fam.add_metric([h], sums[k][h])
        out.append(fam)
    out += [pres.family(), phase.family(), folio.family()]

    ft = CounterMetricFamily("luotrace_files", "Files seen by the preserve path, by final result",
                             labels=["handler", "result"])
    for (h, r), n in sorted(files_by.items()):
        ft.add_metric([h, r], n)
    out.append(ft)
    et = CounterMetricFamily("luotrace_preserve_errors", "Files whose preservation failed, by errno",
                             labels=["handler", "errno"])
    for (h, e), n in sorted(errors.items()):
        et.add_metric([h, e], n)
    out.append(et)
    at = CounterMetricFamily("luotrace_anomalies", "Anomalies found (see the report for evidence), by kind",
                             labels=["handler", "kind"])
    for (h, k), n in sorted(anomalies.items()):
        at.add_metric([h, k], n)
    out.append(at)

    blackout = _Hist("luotrace_blackout_duration_seconds", "LUO freeze span of each session (inside the blackout)", [])
    blackout.observe_ns((), [s["blackout_ns"] for s in rep.get("sessions", []) if s.get("blackout_ns")])
    out.append(blackout.family())

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
    rt = CounterMetricFamily("luotrace_bpf_run_time_seconds", "Time spent in luotrace's BPF programs "
                             "(kernel.bpf_stats): the tracer's own cost", labels=["program"])
    rc = CounterMetricFamily("luotrace_bpf_runs", "Runs of luotrace's BPF programs", labels=["program"])
    for prog, st in sorted((rep.get("bpf", {}).get("programs") or {}).items()):
        rt.add_metric([prog], st.get("run_time_ns", 0) / 1e9)
        rc.add_metric([prog], st.get("run_cnt", 0))
    out += [rt, rc]

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


def exposition(rep: dict) -> str:
    """The text exposition `luotrace serve` would give for this report."""
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry(auto_describe=False)
    LuotraceCollector(lambda: rep, registry=registry)
    return generate_latest(registry).decode()


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
