"""Synthetic preservation runs at any scale, written as ordinary recordings.

A model of the preservation path (per file: can_preserve, preserve with its
count pass, fill pass and vmalloc, LUO freeze inside a session blackout,
retrieve, finish) with a log-normal kho_preserve_folio latency.  Nothing is
generated per folio in Python: in ``folio`` mode the per-file counters and
log2 histograms are drawn directly (a multinomial over the log2 slots), in
``trace`` mode the per-folio records are built as numpy arrays, so a 1 TiB
guest (268 M folios) simulates in a blink.  Used by tests and benchmarks of
everything downstream of the kernel, and by ``luotrace simulate``.
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from . import __version__, catalog
from . import recording as rec
from .abi import SER_DEV
from .errors import LuotraceError
from .events import EV_ENTRY, EV_INSTANT, EV_RETURN, EVENT_DTYPE

PAGE = 4096
GMEM_DEV = 16
SLOTS = np.arange(0, 64)


# The phases whose durations --slow can scale (each drawn by scale() below).
SCALABLE = ("count_pass", "fill_pass", "vmalloc", "luo_freeze", "retrieve", "finish")


@dataclass
class SimSpec:
    files: int = 4
    size: int = 1 << 30  # total bytes, split evenly over the files
    mode: str = "folio"
    handler: str = "guest_memfd"
    folio_ns: float = 250.0  # median kho_preserve_folio latency
    folio_sigma: float = 0.35  # log-normal shape
    count_ns: float = 4.0  # per folio, pass 1
    phase_scale: Dict[str, float] = field(default_factory=dict)  # e.g. {"fill_pass": 1.1}
    jitter: float = 0.05  # run-to-run noise of every phase (log-normal sigma)
    errors: int = 0  # files failing preserve with EHWPOISON half-way
    anomalies: List[str] = field(default_factory=list)  # anomaly codes to inject, one file each
    lost: int = 0  # lost per-folio events to report (trace mode)
    sample_every: int = 1
    seed: int = 0
    labels: Dict[str, str] = field(default_factory=dict)


def parse_size(s: str) -> int:
    from .units import size_bytes
    try:
        n = size_bytes(s)
    except ValueError:
        raise LuotraceError(f"bad size '{s}'", "use e.g. 64M, 1G, 1TiB") from None
    if n < PAGE:
        raise LuotraceError(f"size '{s}' is smaller than one 4 KiB page", "use e.g. 64M, 1G, 1TiB")
    return n


class _Events:
    """Collects lifecycle records (a few per file) before one vectorised build."""

    def __init__(self) -> None:
        self.rows: List[tuple] = []

    def add(self, probe: str, kind: int, ts: int, ino: int, handler: int, ret: int = 0, a0: int = 0,
            a1: int = 0, a2: int = 0, dev: int = GMEM_DEV, tid: int = 1000) -> None:
        self.rows.append((ts, 1000, tid, catalog.PROBE_IDS[probe], kind, 0, ret, ino, dev, handler, a0, a1, a2))

    def call(self, probe: str, start: int, dur: int, ino: int, handler: int, ret: int = 0,
             entry: Tuple[int, int, int] = (0, 0, 0), ret_a: Tuple[int, int] = (0, 0), dev: int = GMEM_DEV,
             tid: int = 1000) -> int:
        self.add(probe, EV_ENTRY, start, ino, handler, 0, entry[0], entry[1], entry[2], dev=dev, tid=tid)
        self.add(probe, EV_RETURN, start + dur, ino, handler, ret, ret_a[0], ret_a[1], dur, dev=dev, tid=tid)
        return start + dur

    def array(self) -> np.ndarray:
        a = np.array(self.rows, dtype=EVENT_DTYPE) if self.rows else np.zeros(0, dtype=EVENT_DTYPE)
        return a[np.argsort(a["ts"], kind="stable")]


def _slot_probs(median_ns: float, sigma: float) -> np.ndarray:
    """P(bpf_log2l(latency) == s) for a log-normal latency: slot s holds [2^(s-1), 2^s)."""
    from math import erf
    mu = math.log(median_ns)
    cdf = lambda x: 0.5 * (1 + erf((math.log(x) - mu) / (sigma * math.sqrt(2)))) if x > 0 else 0.0  # noqa: E731
    p = np.array([cdf(2.0 ** s) - (cdf(2.0 ** (s - 1)) if s > 0 else 0.0) for s in SLOTS])
    return p / p.sum()


def simulate(spec: SimSpec, output: str, progress=lambda s: None, force: bool = False) -> dict:
    if spec.files < 1:
        raise LuotraceError("--files must be at least 1", "e.g. --files 64")
    if spec.mode not in catalog.MODES:
        raise LuotraceError(f"unknown mode '{spec.mode}'", f"choose one of {', '.join(catalog.MODES)}")
    rng = np.random.default_rng(spec.seed)
    handler = catalog.HANDLERS[spec.handler]
    per_file = max(PAGE, spec.size // spec.files // PAGE * PAGE)
    folios = per_file // PAGE
    probs = _slot_probs(spec.folio_ns, spec.folio_sigma)
    mean_ns = spec.folio_ns * math.exp(spec.folio_sigma ** 2 / 2)
    scale = lambda phase: spec.phase_scale.get(phase, 1.0) * float(rng.lognormal(0.0, spec.jitter))  # noqa: E731
    ev = _Events()
    base = 1_000_000_000
    t = base
    folio_stats, folio_hist, population = [], [], []
    bad = {i: "error" for i in range(spec.errors)}
    for j, code in enumerate(spec.anomalies):
        bad.setdefault(spec.errors + j, code)
    session = 0x5E55_0000
    streamed: List[np.ndarray] = []
    inos = list(range(10_000, 10_000 + spec.files))
    for i, ino in enumerate(inos):
        fault = bad.get(i)
        fol = folios - (16 if fault == "holes" else 0)
        ev.add("luo_preserve_file", EV_ENTRY, t, 0, 0, a0=0x1000 + i, a1=3 + i, a2=session)
        t = ev.call("gmem_can_preserve", t + 200, 300, ino, handler, ret=1)
        ev.add("gmem_preserve", EV_ENTRY, t + 100, ino, handler, a0=per_file, a1=3)
        p0 = t + 100
        ev.add("gmem_freeze_inode", EV_INSTANT, p0 + 50, ino, handler, a0=1)
        c_dur = int(fol * spec.count_ns * scale("count_pass")) + 1000
        c_end = ev.call("gmem_walk", p0 + 200, c_dur, ino, handler, entry=(folios, 0, 0), ret_a=(fol, 0))
        n_ok = fol // 2 if fault == "error" else fol
        n_fill = n_ok - 1 if fault == "pass_count_mismatch" else n_ok
        f_dur = int(n_fill * mean_ns * scale("fill_pass")) + 1000
        f_start = c_end + 500
        f_end = ev.call("gmem_walk", f_start, f_dur, ino, handler, ret=-133 if fault == "error" else 0,
                        entry=(folios, 1, 0), ret_a=(n_fill, 1))
        ret = 0
        if fault == "error":
            ret = -133
            ev.add("gmem_freeze_inode", EV_INSTANT, f_end + 300, ino, handler, a0=0)
            p_end = f_end + 500
        elif fault == "pass_count_mismatch":
            ret = -22
            ev.add("gmem_freeze_inode", EV_INSTANT, f_end + 300, ino, handler, a0=0)
            p_end = f_end + 500
        else:
            v_end = ev.call("kho_preserve_vmalloc", f_end + 200, int(2000 * scale("vmalloc")) + 100, ino, handler)
            p_end = v_end + 300
        ev.add("gmem_preserve", EV_RETURN, p_end, ino, handler, ret, 0 if ret else 0xA000_0000 + i, 0, p_end - p0)
        ev.add("luo_preserve_file", EV_RETURN, p_end + 100, 0, 0, ret, 0, 0, p_end + 100 - t)
        if fault == "folio_added_while_frozen" and ret == 0:
            ev.add("pop_add", EV_INSTANT, p_end + 1000, ino, handler, a0=folios - 1, a1=0x12345, a2=0)
        if spec.mode != "light":
            good = n_fill
            counts = rng.multinomial(good, probs) if good else np.zeros(len(SLOTS), dtype=np.int64)
            unpres = n_fill if ret else 0
            if fault == "unwind_incomplete":
                unpres = n_fill - 1
            folio_stats.append({"ino": ino, "dev": GMEM_DEV, "handler": handler, "preserved": good,
                                "preserve_errors": 1 if fault == "error" else 0, "unpreserved": unpres,
                                "restored": 0, "discarded": 0, "pfn_zero": 1 if fault == "pfn_zero" else 0,
                                "preserve_ns": int(good * mean_ns), "pfn_unknown": 0})
            folio_hist += [{"ino": ino, "dev": GMEM_DEV, "handler": handler, "slot": int(s), "count": int(c)}
                           for s, c in zip(SLOTS, counts) if c]
            population.append({"ino": ino, "dev": GMEM_DEV, "handler": handler, "added": fol, "deleted": 0,
                               "large": 4 if fault == "large_folios" else 0,
                               "max_order": 9 if fault == "large_folios" else 0, "deleted_frozen": 0})
        if spec.mode == "trace" and n_fill:
            k = np.arange(0, n_fill, max(1, spec.sample_every))
            lat = rng.lognormal(math.log(spec.folio_ns), spec.folio_sigma, len(k)).astype(np.uint64)
            f = np.zeros(len(k), dtype=EVENT_DTYPE)
            f["ts"] = f_start + (np.arange(len(k), dtype=np.uint64) * (f_dur // max(1, len(k))))
            f["tgid"], f["tid"] = 1000, 1000
            f["probe"], f["kind"] = catalog.PROBE_IDS["kho_preserve_folio"], EV_RETURN
            f["ino"], f["dev"], f["handler"] = ino, GMEM_DEV, handler
            f["a0"], f["a1"], f["a2"] = 0x100000 + k, k, lat
            streamed.append(f)
        t = p_end + 10_000
    # the session freezes every preserved file inside one blackout, then the new kernel retrieves them
    ok = [ino for i, ino in enumerate(inos) if bad.get(i) not in ("error", "pass_count_mismatch")]
    ev.add("luo_file_freeze", EV_ENTRY, t, 0, 0, a2=session)
    ft = t + 1000
    for ino in ok:
        ft = ev.call("gmem_luo_freeze", ft + 200, int(20_000 * scale("luo_freeze")), ino, handler)
    ev.add("luo_file_freeze", EV_RETURN, ft + 500, 0, 0, 0, 0, 0, ft + 500 - t)
    t = ft + 1_000_000
    for i, ino in enumerate(inos):
        if ino not in ok:
            continue
        ser = 0xA000_0000 + i
        r_end = ev.call("gmem_retrieve", t, int(folios * 30 * scale("retrieve")) + 1000, ser, handler,
                        ret_a=(ino + 100_000, 0), dev=SER_DEV)
        t = ev.call("gmem_finish", r_end + 500, int(5000 * scale("finish")), ser, handler, dev=SER_DEV)
        for row in folio_stats:
            if row["ino"] == ino:
                row["restored"] = row["preserved"]
        t += 1000
    lifecycle = ev.array()
    allev = np.concatenate([lifecycle] + streamed) if streamed else lifecycle
    allev = allev[np.argsort(allev["ts"], kind="stable")]
    header = {
        "format": "luotrace.recording", "luotrace_version": __version__, "kernel": "simulated",
        "hostname": socket.gethostname(), "mode": spec.mode, "target": "simulate", "labels": spec.labels,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clock": {"base_monotonic_ns": base, "base_realtime_ns": time.time_ns(), "source": "simulated"},
        "probes": [{"name": p.name, "symbol": p.symbol, "handler": p.handler, "required": p.required,
                    "strategy": "simulated", "status": "attached", "reason": ""}
                   for p in catalog.probes_for(spec.mode, ["guest_memfd"])],
        "layout": {"source": "simulate", "unknown": {}}, "sample_every": spec.sample_every,
        "simulation": {"files": spec.files, "size": spec.size, "seed": spec.seed, "folio_ns": spec.folio_ns,
                       "phase_scale": spec.phase_scale, "errors": spec.errors, "anomalies": spec.anomalies},
    }
    try:
        w = rec.Writer(output, header, force=force)
    except OSError as e:
        raise LuotraceError(f"cannot write {output}: {e.strerror}", "choose a writable path") from None
    step = 1 << 16
    maps = {"counters": {"lost": 0, "folio_lost": spec.lost, "emitted": len(allev)}, "folio_stats": folio_stats,
            "folio_hist": folio_hist, "population": population, "population_attached": spec.mode != "light"}
    end = {"stopped_by": "simulated", "duration_ns": int(t - base), "records": len(allev),
           "bpf": {"run_time_ns": 0, "run_cnt": 0, "stats_enabled": False, "programs": {}}}
    try:
        for s in range(0, len(allev), step):
            w.add(allev[s:s + step].tobytes())
        w.close(maps, end)
    except OSError as e:  # a simulation cut short is worth nothing: remove it
        w.abandon()
        os.unlink(output)
        raise LuotraceError(f"cannot write {output}: {e.strerror}; the partial file was removed",
                            "choose a path with more room, or a smaller --size") from None
    progress(f"luotrace: simulated {spec.files} files, {spec.files * folios} folios, {len(allev)} records")
    return {"records": len(allev), "folios": spec.files * folios, "files": spec.files}
