"""Running totals of what the metrics count, per handler: files by result,
errnos, anomalies, folio and byte counters, and log2 histograms of phase
durations.  A report row is added once; a long-running `serve` folds the
rows of old finished files in here and forgets them, so that its memory and
scrape time depend on the files of the moment, not on every file ever
traced, while every counter stays monotonic.  JSON round-trips exactly."""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from tracer.probes.catalog import FILE_HANDLERS, HANDLER_BY_NAME

# Histogram bounds: every other power of two nanoseconds, 2^11 ns (~2 us) ..
# 2^37 ns (~137 s), 14 buckets: a factor of 4 per bucket keeps a host's
# series within budget (docs/operators.md) and still places a latency within 2x.  The
# in-kernel log2 slot s holds values in [2^(s-1), 2^s - 1] ns (bcc's
# bpf_log2l), so it lands in the first bucket le >= 2^s ns.
LOG2_MIN, LOG2_MAX, LOG2_STEP = 11, 37, 2
BUCKETS_S = [2 ** k / 1e9 for k in range(LOG2_MIN, LOG2_MAX + 1, LOG2_STEP)]
NBUCKETS = len(BUCKETS_S) + 1  # the last one is +Inf

HANDLERS = FILE_HANDLERS  # the handlers whose files are counted (the catalog's)
OUTCOMES = ("ok", "error")  # of a preserve call
# The phases each handler goes through (tracer.analysis.aggregator names them), so that
# their series exist, at zero, before the first update.
PHASES: Dict[str, Tuple[str, ...]] = {h: HANDLER_BY_NAME[h].phases for h in FILE_HANDLERS}
FOLIO_COUNTERS = ("folios_preserved", "folios_unpreserved", "folios_restored", "folios_populated",
                  "bytes_preserved")
HISTS = ("preserve", "phase", "folio", "blackout")


def _index_of_pow2(k: int) -> int:
    """The bucket holding values below 2^k ns."""
    return min((max(k, LOG2_MIN) - LOG2_MIN + LOG2_STEP - 1) // LOG2_STEP, len(BUCKETS_S))


def bucket_index_ns(v: int) -> int:
    return _index_of_pow2(int(v).bit_length())  # v < 2^bit_length


def slot_counts(slots: Dict[int, int]) -> List[int]:
    """In-kernel log2 slots -> per-bucket counts on BUCKETS_S (slot s <= 2^s - 1 ns)."""
    counts = [0] * NBUCKETS
    for slot, c in slots.items():
        counts[_index_of_pow2(int(slot))] += c
    return counts


class Totals:
    """Counters keyed by label tuples; histograms as (bucket counts, sum in seconds)."""

    def __init__(self) -> None:
        self.counters: Dict[str, Dict[str, int]] = {k: {h: 0 for h in HANDLERS} for k in FOLIO_COUNTERS}
        self.files: Dict[Tuple[str, str], int] = {}  # (handler, result)
        self.errors: Dict[Tuple[str, str], int] = {}  # (handler, errno)
        self.anomalies: Dict[Tuple[str, str], int] = {}  # (handler, code)
        self.hists: Dict[str, Dict[Tuple[str, ...], Tuple[List[int], float]]] = {k: {} for k in HISTS}
        self.nfiles = 0  # rows added

    def _hist_add(self, hist: str, labels: Tuple[str, ...], counts: List[int], sum_s: float) -> None:
        cur, s = self.hists[hist].get(labels, ([0] * NBUCKETS, 0.0))
        self.hists[hist][labels] = ([a + b for a, b in zip(cur, counts)], s + sum_s)

    def observe_ns(self, hist: str, labels: Tuple[str, ...], values: Iterable[int]) -> None:
        counts, total = [0] * NBUCKETS, 0
        for v in values:
            counts[bucket_index_ns(v)] += 1
            total += v
        self._hist_add(hist, labels, counts, total / 1e9)

    def add_file(self, f: dict) -> None:
        """One report row (see tracer.analysis.report): what the metrics count of it."""
        h = f["handler"]
        if h not in HANDLERS:
            return
        self.nfiles += 1
        c = self.counters
        c["folios_populated"][h] += f.get("folios_populated") or 0
        if f["result"] == "none":
            return
        c["folios_preserved"][h] += f.get("folios_preserved") or 0
        c["folios_unpreserved"][h] += f.get("folios_unpreserved") or 0
        c["folios_restored"][h] += (f.get("folios_restored") or 0) + (f.get("folios_discarded") or 0)
        if f["result"] in ("ok", "retrieved", "discarded"):
            c["bytes_preserved"][h] += f.get("size_bytes") or 0
        _inc(self.files, (h, f["result"]))
        if f.get("errno"):
            _inc(self.errors, (h, f["errno"]))
        for a in f.get("anomalies", []):
            _inc(self.anomalies, (h, a["code"]))
        if f.get("preserve"):
            outcome = "error" if f.get("failed_phase") == "preserve" else "ok"
            self.observe_ns("preserve", (h, outcome), [f["preserve"]["duration_ns"]])
        for p in f.get("phases", []):
            if p["name"] != "preserve":
                self.observe_ns("phase", (h, p["name"]), [p["duration_ns"]])
        slots = f.get("folio_latency_log2_ns") or {}
        if slots:
            self._hist_add("folio", (h,), slot_counts({int(k): v for k, v in slots.items()}),
                           (f.get("folio_preserve_ns_total") or 0) / 1e9)

    def add_session(self, s: dict) -> None:
        if s.get("blackout_ns"):
            self.observe_ns("blackout", (), [s["blackout_ns"]])

    def to_json(self) -> dict:
        return {"files_added": self.nfiles, "counters": self.counters,
                "files": [[*k, v] for k, v in sorted(self.files.items())],
                "errors": [[*k, v] for k, v in sorted(self.errors.items())],
                "anomalies": [[*k, v] for k, v in sorted(self.anomalies.items())],
                "hists": {name: [[list(labels), counts, s] for labels, (counts, s) in sorted(per.items())]
                          for name, per in self.hists.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Totals":
        t = cls()
        if not d:
            return t
        t.nfiles = d.get("files_added", 0)
        for k, per in d.get("counters", {}).items():
            t.counters.setdefault(k, {}).update(per)
        for name, target in (("files", t.files), ("errors", t.errors), ("anomalies", t.anomalies)):
            for a, b, v in d.get(name, []):
                target[(a, b)] = v
        for name, rows in d.get("hists", {}).items():
            for labels, counts, s in rows:
                t.hists.setdefault(name, {})[tuple(labels)] = (list(counts), s)
        return t

    @classmethod
    def of_report(cls, rep: dict) -> "Totals":
        """What a report counts, folded: the totals a long-running serve
        retired (files it no longer keeps), plus every file and session the
        report still holds.  The metrics are this; no exporter folds again."""
        t = cls.from_json((rep.get("retired") or {}).get("totals") or {})
        for f in rep.get("files", []):
            t.add_file(f)
        for s in rep.get("sessions", []):
            t.add_session(s)
        return t


def _inc(d: Dict[Tuple[str, str], int], key: Tuple[str, str]) -> None:
    d[key] = d.get(key, 0) + 1
