"""Synthetic preservation runs at any scale, written as ordinary recordings.

A model of the preservation path (per file: can_preserve, preserve with its
count pass, fill pass and vmalloc, LUO freeze inside a session blackout,
retrieve, finish) with a log-normal kho_preserve_folio latency.  Nothing is
generated per folio in Python: in ``folio`` mode the per-file counters and
log2 histograms are drawn directly (a multinomial over the log2 slots), in
``trace`` mode the per-folio records are built as numpy arrays, so a 1 TiB
guest (268 M folios) simulates in a blink.  Trace mode's per-folio records
are drawn and written a chunk at a time (CHUNK records, merged in time order
with the few lifecycle records), so memory stays bounded at any size; its
file is estimated first and refused when the disk cannot hold it.  Used by
tests and benchmarks of everything downstream of the kernel, and by
``luotrace simulate``.
"""
from __future__ import annotations

import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from tracer.probes import catalog
from tracer.recording import format as rec
from tracer.recording import header
from tracer.kernel.abi import SER_DEV
from tracer.base.errors import LuotraceError
from tracer.base.units import PAGE_SIZE
from tracer.probes.events import EV_ENTRY, EV_INSTANT, EV_RETURN, EVENT_DTYPE, EVENT_SIZE

GMEM_DEV = 16
SLOTS = np.arange(0, 64)
CHUNK = 1 << 16  # records drawn, merged and written at a time (4 MiB)


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
    jitter: float = 0.05  # call-to-call noise of every phase (log-normal sigma)
    run_noise: float = 0.0  # one factor for the whole recording (log-normal sigma): a boot's effect
    errors: int = 0  # files failing preserve with EHWPOISON half-way
    anomalies: List[str] = field(default_factory=list)  # anomaly codes to inject, one file each
    lost: int = 0  # lost per-folio events to report (trace mode)
    sample_every: int = 1
    seed: int = 0
    labels: Dict[str, str] = field(default_factory=dict)
    freeze_op: bool = True  # False: the handler has no LUO freeze op (the series' latest revision)
    # who and when, for fleet load tests (many hosts' recordings from one machine)
    hostname: Optional[str] = None  # None: this host's name
    kernel: str = "simulated"
    started_ns: Optional[int] = None  # wall clock of the recording's start; None: now


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
    per_file = max(PAGE_SIZE, spec.size // spec.files // PAGE_SIZE * PAGE_SIZE)
    folios = per_file // PAGE_SIZE
    probs = _slot_probs(spec.folio_ns, spec.folio_sigma)
    mean_ns = spec.folio_ns * math.exp(spec.folio_sigma ** 2 / 2)
    # a separate stream: a recording without run noise is the same bytes as before it existed
    run = float(np.random.default_rng([spec.seed, 1]).lognormal(0.0, spec.run_noise)) if spec.run_noise else 1.0
    scale = lambda phase: run * spec.phase_scale.get(phase, 1.0) * float(rng.lognormal(0.0, spec.jitter))  # noqa: E731
    ev = _Events()
    base = 1_000_000_000
    t = base
    folio_stats, folio_hist, population = [], [], []
    bad = {i: "error" for i in range(spec.errors)}
    for j, code in enumerate(spec.anomalies):
        bad.setdefault(spec.errors + j, code)
    session = 0x5E55_0000
    fills: List[Tuple[int, int, int, int]] = []  # trace mode: (ino, start, duration, folios) of each fill pass
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
            fills.append((ino, f_start, f_dur, n_fill))
        t = p_end + 10_000
    # the session freezes every preserved file inside one blackout, then the new kernel retrieves them
    ok = [ino for i, ino in enumerate(inos) if bad.get(i) not in ("error", "pass_count_mismatch")]
    ev.add("luo_file_freeze", EV_ENTRY, t, 0, 0, a2=session)
    ft = t + 1000
    for ino in ok if spec.freeze_op else ():
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
    step = max(1, spec.sample_every)
    records = len(lifecycle) + sum(-(-n // step) for *_, n in fills)
    _check_room(output, records, spec)
    real_ns = time.time_ns() if spec.started_ns is None else spec.started_ns
    head = header.build(
        kernel=spec.kernel, hostname=spec.hostname or socket.gethostname(), mode=spec.mode, target="simulate",
        labels=spec.labels, base_ns=base, real_ns=real_ns, clock_source="simulated",
        probes=[{"name": p.name, "symbol": p.symbol, "handler": p.handler, "required": p.required,
                 "strategy": "simulated", "status": "attached", "reason": ""}
                for p in catalog.probes_for(spec.mode, ["guest_memfd"])],
        gmem={"backing": "simulated", "why": "luotrace simulate: no file was made", "dev": GMEM_DEV},
        layout={"source": "simulate", "unknown": {}}, sample_every=spec.sample_every,
        simulation={"files": spec.files, "size": spec.size, "seed": spec.seed, "folio_ns": spec.folio_ns,
                    "phase_scale": spec.phase_scale, "errors": spec.errors, "anomalies": spec.anomalies,
                    **({"run_noise": spec.run_noise, "run_factor": run} if spec.run_noise else {})})
    try:
        w = rec.Writer(output, head, force=force)
    except OSError as e:
        raise LuotraceError(f"cannot write {output}: {e.strerror}", "choose a writable path") from None
    maps = {"counters": {"lost": 0, "folio_lost": spec.lost, "emitted": records}, "folio_stats": folio_stats,
            "folio_hist": folio_hist, "population": population, "population_attached": spec.mode != "light"}
    end = {"stopped_by": "simulated", "duration_ns": int(t - base), "records": records,
           "bpf": {"run_time_ns": 0, "run_cnt": 0, "stats_enabled": False, "programs": {}}}
    try:
        done, every = 0, max(16 * CHUNK, records // 10)  # said at most ten times, and only for a large run
        for part in _merged(lifecycle, _folio_records(spec, handler, fills)):
            w.add(part.tobytes())
            done += len(part)
            if done // every != (done - len(part)) // every and done < records:
                progress(f"luotrace: {done * 100 // records}% of {records} records written")
        w.close(maps, end)
    except OSError as e:  # a simulation cut short is worth nothing: remove it
        w.abandon()
        os.unlink(output)
        raise LuotraceError(f"cannot write {output}: {e.strerror}; the partial file was removed",
                            "choose a path with more room, or a smaller --size") from None
    progress(f"luotrace: simulated {spec.files} files, {spec.files * folios} folios, {records} records")
    return {"records": records, "folios": spec.files * folios, "files": spec.files}


def _folio_records(spec: SimSpec, handler: int, fills: List[Tuple[int, int, int, int]]) -> Iterator[np.ndarray]:
    """Trace mode's kho_preserve_folio records, file after file, CHUNK at a
    time; each file's latencies come from its own seeded generator."""
    step = max(1, spec.sample_every)
    for ino, start, dur, n_fill in fills:
        rng = np.random.default_rng([spec.seed, ino])
        n = -(-n_fill // step)
        gap = dur // n
        for s in range(0, n, CHUNK):
            i = np.arange(s, min(n, s + CHUNK), dtype=np.uint64)
            f = np.zeros(len(i), dtype=EVENT_DTYPE)
            f["ts"] = start + i * np.uint64(gap)
            f["tgid"], f["tid"] = 1000, 1000
            f["probe"], f["kind"] = catalog.PROBE_IDS["kho_preserve_folio"], EV_RETURN
            f["ino"], f["dev"], f["handler"] = ino, GMEM_DEV, handler
            k = i * np.uint64(step)
            f["a0"], f["a1"] = 0x100000 + k, k
            f["a2"] = rng.lognormal(math.log(spec.folio_ns), spec.folio_sigma, len(i)).astype(np.uint64)
            yield f


def _merged(lifecycle: np.ndarray, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """LIFECYCLE (sorted) and CHUNKS (each sorted, each after the one before)
    as one stream in time order, lifecycle records first on a tie: what one
    stable sort of everything gave, a chunk at a time."""
    pos = 0
    for c in chunks:
        upto = int(np.searchsorted(lifecycle["ts"], c["ts"][-1], side="right"))
        part = np.concatenate([lifecycle[pos:upto], c])
        pos = upto
        yield part[np.argsort(part["ts"], kind="stable")]
    if pos < len(lifecycle):
        yield lifecycle[pos:]


def _check_room(output: str, records: int, spec: SimSpec) -> None:
    """Refuse, before writing anything, a file the disk cannot hold."""
    # records, their chunks' headers, the header, and the map dump (per-file rows)
    need = records * EVENT_SIZE + (records // CHUNK + 1) * 16 + (64 << 10) + spec.files * (8 << 10)
    where = os.path.dirname(os.path.abspath(output))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # the writer says what is wrong with the path
    if need > free:
        raise LuotraceError(f"this simulation writes about {_gib(need)} ({records} records, {spec.mode} mode) and "
                            f"{where} has {_gib(free)} free",
                            "use --mode folio (no per-folio records), --sample N, a smaller --size, "
                            "or write elsewhere")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
