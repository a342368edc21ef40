"""Overhead benchmarks (`make bench`): every figure is a ratio against an
untraced baseline measured in the same run, on the same machine.

1. guest_memfd population, 1 GiB (262,144 folios, fallocate): untraced; an
   empty BPF program on the same tracepoints (the floor any per-folio probe
   pays here); luotrace in light mode (tracing the model's lifecycle, nothing
   on population), as a service (serve's default: folio mode, population
   tracepoints only while a file is in an update, and no update here), folio
   and trace modes (population tracepoints, in-kernel aggregation); bpftrace
   doing the same per-inode count.
3. Exporter: scrape latency with 64 files and full histograms, CPU while idle.
4. Offline: simulate and replay records/s; a 1 TiB / 64-file run summarised
   (time to report, peak RSS).
5. Live ingest in trace mode (tests/bench_ingest.py): records/s from a real
   ring buffer through the consumer, lost records, consumer CPU, and where
   it goes (records a batch, wakeups and system calls a second, us a record
   per stage), the paced consumer against the consumer as it was.
6. Time to ready, cold and warm, and serve's idle footprint (tests/bench_ready.py).
2. Reference model, 64 MiB preserve (16,384 folios): untraced and traced in each
   mode through uprobes (folio: the folio arrays read a page per run;
   folio-latency: a program per kho_preserve_folio).  Uprobes cost microseconds a hit, so these ratios
   measure the uprobe mechanism; the BPF programs' own cost per run
   (kernel.bpf_stats) is printed too: it is what a kprobe/fentry deployment adds
   per call, plus the attach mechanism's own cost.

Runs are interleaved and repeated (each population run populates 5 times);
medians are reported.
"""
from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

from tracer.kernel import host as kernel
from tracer.probes.plan import Options
from tracer.live.runner import run
from tracer.kernel.backing import gmem_superblock_dev

from .bench_ingest import ingest
from .bench_soak import soak

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "workloads", "model", "luo_model")
REPS = int(os.environ.get("LUOTRACE_BENCH_REPS", "3"))
INNER = ["--repeat", "5"]  # populations per traced session (median): compile cost stays out of the figure
quiet = lambda s: None  # noqa: E731


def populate(tmp: str, size: str = "1G") -> int:
    out = os.path.join(tmp, "pop.json")
    subprocess.run([sys.executable, "-m", "workloads.populate", "--json", out, *INNER, size], check=True, cwd=REPO)
    return json.load(open(out))["populate_ns"]


def populate_traced(tmp: str, mode: str, size: str = "1G"):
    out = os.path.join(tmp, "pop.json")
    if mode == "service":  # serve's default: folio mode, population only during an update (none here)
        opts = Options(mode="folio", handlers=["population"], population="update")
    elif mode == "light":
        opts = Options(mode="light", model=MODEL)
    else:
        opts = Options(mode=mode, handlers=["population"])
    res = run(opts, None, command=[sys.executable, "-m", "workloads.populate", "--json", out, *INNER, size],
              progress=quiet)
    return json.load(open(out))["populate_ns"], res.report["bpf"]


def _progs() -> Dict[int, dict]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True).stdout
    return {p["id"]: p for p in json.loads(out or "[]")}


def _new_prog_stats(before: Dict[int, dict]) -> dict:
    tot = {"run_time_ns": 0, "run_cnt": 0}
    for pid, p in _progs().items():
        if pid not in before:
            tot["run_time_ns"] += p.get("run_time_ns", 0)
            tot["run_cnt"] += p.get("run_cnt", 0)
    return tot


def populate_floor(tmp: str, size: str = "1G"):
    """The attach mechanism alone: a BPF program on the same tracepoints that
    does nothing, bpf_stats on as in the traced runs.  What any per-folio
    probe costs here before it does any work."""
    from bcc import BPF
    stats = kernel.BpfStats()
    before = _progs()
    b = BPF(text="TRACEPOINT_PROBE(filemap, mm_filemap_add_to_page_cache) { return 0; }\n"
                 "TRACEPOINT_PROBE(filemap, mm_filemap_delete_from_page_cache) { return 0; }")
    try:
        return populate(tmp, size), _new_prog_stats(before)
    finally:
        b.cleanup()
        stats.close()


def populate_bpftrace(tmp: str, dev: int, size: str = "1G"):
    """bpftrace doing the same per-inode count, its programs' cost read the same way (bpf_stats)."""
    prog = "tracepoint:filemap:mm_filemap_add_to_page_cache /args->s_dev == %d/ { @[args->i_ino] = count(); }" % dev
    stats = kernel.BpfStats()
    before = _progs()
    bt = subprocess.Popen(["bpftrace", "-e", prog], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while "Attaching" not in (bt.stdout.readline() or "Attaching"):
            pass
        time.sleep(0.3)
        ns = populate(tmp, size)
        return ns, _new_prog_stats(before)
    finally:
        stats.close()
        bt.send_signal(signal.SIGINT)
        bt.communicate(timeout=30)


def model_run(tmp: str, mode: str = "", size: str = "64M"):
    truth = os.path.join(tmp, "m.json")
    cmd = [MODEL, "--json", truth, f"keep:gmem:{size}"]
    bpf = {}
    if mode:  # "folio-latency": folio mode with --folio-latency
        res = run(Options(mode=mode.split("-")[0], model=MODEL, folio_latency=mode == "folio-latency"), None,
                  command=cmd, progress=quiet)
        bpf = res.report["bpf"]
    else:
        subprocess.run(cmd, check=True)
    return json.load(open(truth))["sessions_ns"], bpf


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exporter(tmp: str) -> List[str]:
    """Scrape latency with 64 files and full histograms (live: every scrape
    reads the BPF maps and rebuilds the state), and the exporter's CPU while
    idle with its probes attached."""
    import urllib.request
    rows = []
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "tracer.cli", "serve", "--listen", f"127.0.0.1:{port}",
                          "--model", MODEL], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        while "metrics on" not in (p.stderr.readline() or "metrics on"):
            pass
        files = ",".join(["gmem:256K"] * 63 + ["memfd:256K"])
        subprocess.run([MODEL, "--json", os.path.join(tmp, "t.json"), f"keep:{files}"], check=True)
        url = f"http://127.0.0.1:{port}/metrics"
        time.sleep(0.5)
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            body = urllib.request.urlopen(url, timeout=10).read()
            times.append(time.perf_counter() - t0)
        series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
        med = statistics.median(times)
        rows.append(f"exporter, 64 files live (maps read at each scrape): scrape median {1e3 * med:.1f} ms, "
                    f"max {1e3 * max(times):.1f} ms, {series} series; ratio to the 50 ms target {med / 0.05:.2f}")
        c0 = _cpu_s(p.pid)
        time.sleep(10)
        rows.append(f"exporter live and idle (probes attached, no events, no scrapes): "
                    f"{100 * (_cpu_s(p.pid) - c0) / 10:.2f} % of one CPU")
    finally:
        p.terminate()
        p.wait(30)
    return rows


def _peak_mib(args: List[str]) -> Tuple[float, int]:
    """Seconds and peak RSS (VmHWM, read by the command itself: a child's
    ru_maxrss starts at its forking parent's) of one luotrace command."""
    code = ("import sys, time\nt = time.perf_counter()\nfrom tracer.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "finally:\n    print('PEAK', time.perf_counter() - t, [l.split()[1] for l in open('/proc/self/status') "
            "if l.startswith('VmHWM')][0], file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("PEAK ")), None)
    if r.returncode not in (0, 3) or line is None:  # compare may exit 3 (a change): still measured
        raise RuntimeError(f"luotrace {' '.join(args)} failed: {r.stderr.strip()[-300:]}")
    _, secs, kb = line.split()
    return float(secs), int(kb) >> 10


def offline(tmp: str) -> List[str]:
    """Replay and simulate throughput, and the 1 TiB / 64-file summary's time and memory."""
    from tracer.recording import format as rec
    from tracer.analysis.replay import report_of
    from tracer.analysis.simulate import SimSpec, simulate
    rows = []
    path = os.path.join(tmp, "trace.luo")
    t0 = time.perf_counter()
    info = simulate(SimSpec(files=8, size=16 << 30, mode="trace"), path)  # 4 M per-folio records
    t_sim = time.perf_counter() - t0
    rows.append(f"simulate (trace mode, 16 GiB): {info['records'] / t_sim / 1e6:.1f} M records/s "
                f"({info['records']} records, {os.path.getsize(path) >> 20} MiB)")
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = rec.read(path)
        report_of(r)
        rates.append(info["records"] / (time.perf_counter() - t0))
    rows.append(f"replay: {statistics.median(rates) / 1e6:.1f} M records/s (target 30; ratio "
                f"{statistics.median(rates) / 30e6:.2f})")
    # Peak memory of each offline command on that 4 M-record recording
    # (270 MiB on disk): bounded, not growing with the recording.
    mib = os.path.getsize(path) >> 20
    for name, args in (("simulate (trace, 16 GiB)", ["simulate", "-o", os.path.join(tmp, "again.luo"), "--files", "8",
                                                      "--size", "16G", "--mode", "trace"]),
                       ("report", ["report", "--json", path]),
                       ("timeline", ["timeline", path, "-o", os.path.join(tmp, "t.json")]),
                       ("compare", ["compare", path, path])):
        secs, peak = _peak_mib(args)
        rows.append(f"{name} of {info['records'] / 1e6:.1f} M records: peak RSS {peak} MiB (target 200: ratio "
                    f"{peak / 200:.2f}; the recording is {mib} MiB), {secs:.1f} s")
    big = os.path.join(tmp, "1tib.luo")
    simulate(SimSpec(files=64, size=1 << 40, mode="folio"), big)
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
    code = ("import time,sys; t=time.perf_counter(); from tracer.analysis.replay import replay; "
            "r=replay(sys.argv[1]); el=time.perf_counter()-t; "
            "hwm=[l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print(el, r['totals']['folios_preserved'], hwm)")
    out = subprocess.run([sys.executable, "-c", code, big], capture_output=True, text=True, check=True, cwd=REPO)
    secs, folios, rss_kb = out.stdout.split()
    rows.append(f"1 TiB / 64 files (folio mode, {int(folios):,} folios): report ready {float(secs) * 1e3:.0f} ms "
                f"after reading starts (target 1 s: ratio {float(secs):.2f}); peak RSS {int(rss_kb) >> 10} MiB "
                f"(target 500: ratio {(int(rss_kb) >> 10) / 500:.2f})")
    return rows


def detach() -> List[str]:
    """Detaching the model's probes (folio mode, every one a uprobe): all at
    once (luotrace's close) against BCC's cleanup one by one, same run."""
    from tracer.attach import tracer as loader
    from tracer.probes.layout import resolve_layout
    from tracer.probes.plan import Options
    from tracer.attach.tracer import Tracer, detach_all
    opts = Options(mode="folio", model=MODEL)
    times: Dict[str, List[float]] = {"parallel": [], "sequential": []}
    n = 0
    for _ in range(REPS):
        for how in times:
            t = Tracer(opts, resolve_layout(MODEL), lambda b: None)
            n = sum(1 for s in t.statuses if s.status == "attached")
            t0 = time.perf_counter()
            if how == "sequential":
                loader.detach_all = lambda b, progress=None: 0  # what close() did before: BCC's cleanup alone
            try:
                t.close()
            finally:
                loader.detach_all = detach_all
            times[how].append(time.perf_counter() - t0)
    par, seq = statistics.median(times["parallel"]), statistics.median(times["sequential"])
    return [f"detach {n} uprobes: {par:.2f} s all at once, {seq:.2f} s one by one (ratio {par / seq:.2f}, "
            f"spread {min(times['parallel']):.2f}-{max(times['parallel']):.2f} s)"]


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench: run as root (make bench)")
    dev = gmem_superblock_dev()
    rows: List[str] = []
    with tempfile.TemporaryDirectory(prefix="luotrace-bench-") as tmp:
        print(f"luotrace bench: {REPS} interleaved runs per configuration, medians; kernel {os.uname().release}, "
              f"{os.cpu_count()} CPUs", flush=True)
        # 1. population
        samples: Dict[str, List[float]] = {k: [] for k in ("baseline", "floor", "light", "service", "folio", "trace",
                                                           "bpftrace")}
        cost: Dict[str, dict] = {}
        rng = random.Random(7)
        for i in range(REPS):
            order = list(samples)
            rng.shuffle(order)  # no configuration always runs first after a free
            for k in order:
                if k == "baseline":
                    samples[k].append(populate(tmp))
                elif k == "bpftrace":
                    ns, cost[k] = populate_bpftrace(tmp, dev)
                    samples[k].append(ns)
                elif k == "floor":
                    ns, cost[k] = populate_floor(tmp)
                    samples[k].append(ns)
                else:
                    ns, cost[k] = populate_traced(tmp, k)
                    samples[k].append(ns)
            print(f"  population round {i + 1}/{REPS} done", file=sys.stderr, flush=True)
        base = statistics.median(samples["baseline"])
        spread = (max(samples["baseline"]) - min(samples["baseline"])) / base
        per_folio = base / 262144
        rows.append(f"gmem population 1 GiB (262,144 folios): baseline {base / 1e6:.1f} ms median "
                    f"({per_folio:.0f} ns/folio); run-to-run spread of the baseline {100 * spread:.0f} %")
        rows.append("  config    median     wall ratio   BPF runs   BPF ns/run   BPF cost / baseline folio cost")
        for k in ("floor", "light", "service", "folio", "trace", "bpftrace"):
            m = statistics.median(samples[k])
            c = cost.get(k, {})
            runs = c.get("run_cnt", 0)
            per = c["run_time_ns"] / runs if runs else 0.0  # a run per folio added or removed
            rows.append(f"  {k:<9} {m / 1e6:7.1f} ms   {m / base:6.3f}  {runs:10d}   {per:6.0f}         "
                        f"{100 * per / per_folio:5.1f} %")
        # 2. model
        model_cfgs = ("light", "folio", "folio-latency", "trace")
        msamples: Dict[str, List[float]] = {k: [] for k in ("baseline",) + model_cfgs}
        mcost: Dict[str, dict] = {}
        for i in range(REPS):
            msamples["baseline"].append(model_run(tmp)[0])
            for mode in model_cfgs:
                ns, bpf = model_run(tmp, mode)
                msamples[mode].append(ns)
                mcost[mode] = bpf
            print(f"  model round {i + 1}/{REPS} done", file=sys.stderr, flush=True)
        mbase = statistics.median(msamples["baseline"])
        rows.append(f"model preserve 64 MiB (16,384 folios, uprobes): baseline {mbase / 1e6:.2f} ms")
        for k in model_cfgs:
            m = statistics.median(msamples[k])
            c = mcost[k]
            per = c["run_time_ns"] / c["run_cnt"] if c.get("run_cnt") else 0
            rows.append(f"  {k:<13} {m / 1e6:8.2f} ms  ratio {m / mbase:.2f}  (BPF {per:.0f} ns/run, {c.get('run_cnt', 0)} runs:"
                        f" {c.get('run_time_ns', 0) / mbase:.3f} x baseline spent in BPF itself)")
        rows += exporter(tmp)
        rows += offline(tmp)
        rows += detach()
        rows += soak(float(os.environ.get("LUOTRACE_SOAK_MINUTES", "3")))
        rows += ingest(tmp)
        from .bench_ready import footprint, ready  # it uses this module's helpers
        rows += ready(tmp) + footprint(tmp)
        from .bench_top import frame_cost, idle_cost, join_cost
        rows += frame_cost() + join_cost(tmp) + idle_cost()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
