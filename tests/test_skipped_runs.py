"""Runs of luotrace's BPF programs the kernel skipped: counted and shown.

A kprobe or perf-tracepoint program does not run while its CPU is inside
BPF already (kernel/trace/bpf_trace.c, trace_call_bpf: bpf_prog_active).  A
BPF map syscall holds that guard too, and on a preemptible kernel keeps
holding it while its task is preempted: every such program on that CPU is
skipped meanwhile.  The lane met it (a bpftrace referee counting kprobes came
up short while `luotrace top` read maps every half second).  The kernel
counts each skip per program (recursion_misses); luotrace reads it with the
run counts and says it in the report, the metrics and top, because what a
skipped program counts is short.

Kernel tier: a real skip, made by map syscalls on the CPU a timer tracepoint
fires on, read through luotrace.  Unit tier: a recording whose programs were
skipped, through report, the metrics and top."""
from __future__ import annotations

import json
import os
import time

from exporters.prometheus import exposition
from tests.conftest import run_cli
from tracer.analysis.simulate import SimSpec, simulate
from tracer.kernel import host
from tracer.recording import format as rec


def test_the_kernel_counts_a_skipped_run_and_luotrace_reads_it(root):
    from bcc import BPF
    was = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    b = BPF(text="BPF_ARRAY(a, u64, 1);\nTRACEPOINT_PROBE(timer, hrtimer_expire_entry) { return 0; }")
    try:
        fd = b.funcs[b"tracepoint__timer__hrtimer_expire_entry"].fd
        assert host.prog_stats(fd)["recursion_misses"] == 0
        a, k = b["a"], b["a"].Key(0)
        deadline = time.monotonic() + 20
        while host.prog_stats(fd)["recursion_misses"] == 0 and time.monotonic() < deadline:
            for _ in range(2000):  # lookups by syscall: the CPU's BPF guard held inside each
                a[k]
        assert host.prog_stats(fd)["recursion_misses"] > 0, "no timer fired inside a map syscall in 20 s"
    finally:
        b.cleanup()
        os.sched_setaffinity(0, was)


def _skipped(tmp_path) -> str:
    """A simulated recording rewritten with a trailer whose programs the kernel skipped."""
    src, out = str(tmp_path / "sim.luo"), str(tmp_path / "skipped.luo")
    simulate(SimSpec(files=2, size=4 << 20, mode="folio", seed=1), src)
    r = rec.read(src)
    w = rec.Writer(out, r.header)
    for c in r.chunks:
        w.add(c.tobytes())
    progs = {"kfunc__kho_preserve_folio": {"run_time_ns": 900, "run_cnt": 40, "recursion_misses": 0},
             "tracepoint__filemap__mm_filemap_add_to_page_cache": {"run_time_ns": 300, "run_cnt": 30,
                                                                    "recursion_misses": 7}}
    w.close(r.maps or {}, {**(r.end or {}), "bpf": {"run_time_ns": 1200, "run_cnt": 70, "missed": 7,
                                                    "stats_enabled": True, "programs": progs}})
    return out


def test_skipped_runs_reach_the_report_the_metrics_and_top(tmp_path):
    path = _skipped(tmp_path)
    rep = json.loads(run_cli("report", "--json", path, check=True).stdout)
    assert rep["bpf"]["missed"] == 7
    assert rep["bpf"]["programs"]["tracepoint__filemap__mm_filemap_add_to_page_cache"]["missed"] == 7
    assert "missed" not in rep["bpf"]["programs"]["kfunc__kho_preserve_folio"]
    text = run_cli("report", path, check=True).stdout
    warn = [ln for ln in text.splitlines() if ln.startswith("WARNING: the kernel skipped")]
    assert warn == ["WARNING: the kernel skipped 7 runs of luotrace's programs "
                    "(tracepoint__filemap__mm_filemap_add_to_page_cache 7): that CPU was inside BPF already "
                    "(another tool's program, or a BPF map syscall preempted there); what those programs "
                    "count may be short"]
    assert "luotrace_bpf_runs_missed_total 7.0" in exposition(rep)
    frames = [json.loads(x) for x in run_cli("top", "--replay", path, "--speed", "0", "--json", "0.001",
                                             check=True).stdout.splitlines() if x.strip()]
    assert frames[-1]["finished"] and frames[-1]["missed"] == 7
    once = run_cli("top", "--replay", path, "--once", check=True).stdout
    assert "lost 0 (+7 runs skipped)" in once


def test_nothing_skipped_says_nothing(tmp_path):
    path = str(tmp_path / "sim.luo")
    simulate(SimSpec(files=2, size=4 << 20, mode="folio", seed=1), path)
    rep = json.loads(run_cli("report", "--json", path, check=True).stdout)
    assert rep["bpf"]["missed"] == 0
    assert "skipped" not in run_cli("report", path, check=True).stdout
    assert "luotrace_bpf_runs_missed_total 0.0" in exposition(rep)
