"""Live ingest in trace mode (`make bench`): how many per-folio records a
second luotrace's consumer takes from a BPF ring buffer into the aggregator
and the recording, without losing any.

The kernel functions that emit per-folio records (kho_preserve_folio and
siblings) are rare on this machine's kernel, and uprobes on the model cap
near 40 k calls a second, so the source here is a bench-only BPF program on
the real page-cache tracepoint: one luotrace per-folio record (the kernel
side's own struct, ring buffer and emit_folio from bpf/luotrace.h) per folio
a tmpfs file gains, while another process fills and empties that file at a
set rate.  The consumer side is luotrace's own: tracer/attach/ringbuf.py, numpy
decode, Aggregator.feed, recording Writer, as a live session runs them.
"""
from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import time
from typing import List, Tuple

from tracer.kernel import host as kernel
from tracer.attach import ringbuf
from tracer.recording import format as rec
from tracer.analysis.aggregator import Aggregator
from tracer.probes.events import EVENT_SIZE, decode
from tracer.probes.layout import kernel_layout
from tracer.probes.program import COUNTER_NAMES, bpf_source, cflags
from tracer.probes.plan import Options
from tracer.attach.ringbuf import RingReader
from tracer.kernel.backing import gmem_superblock_dev

HARNESS = r"""
/* bench only (tests/bench_ingest.py): a per-folio record for each folio added
 * to a guest_memfd, through the real page-cache tracepoint. */
TRACEPOINT_PROBE(filemap, mm_filemap_add_to_page_cache)
{
	struct luo_event e;
	if (args->s_dev != TARGET_DEV)
		return 0;
	ev_init(&e, PROBE_kho_preserve_folio, EV_RETURN);
	e.ino = args->i_ino;
	e.dev = args->s_dev;
	e.handler = HANDLER_MEMFD;
	e.a0 = args->pfn;
	e.a1 = args->index;
	emit_folio(&e);
	return 0;
}
"""

PRODUCER = r"""
import sys, time
from tracer.kernel.backing import VM
total, rate = int(sys.argv[1]), float(sys.argv[2])
chunk = 4096 * 4096  # 16 MiB: 4096 folios per fill
with VM() as vm:
    f = vm.create_gmem(chunk)
    print(f.ino, flush=True)
    sys.stdin.readline()  # the tracer is attached
    t0 = time.monotonic()
    done = 0
    while done < total:
        f.populate(0, chunk)
        f.punch(0, chunk)
        done += 4096
        if rate:
            ahead = done / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    print(time.monotonic() - t0, flush=True)
"""


def load_harness(ring_pages: int):
    """The bench-only program, compiled with luotrace's own header and flags,
    counting folios added to any guest_memfd; and a reader of its ring."""
    from bcc import BPF
    opts = Options(mode="trace", folio_ringbuf_pages=ring_pages)
    b = BPF(text=bpf_source([]) + HARNESS,
            cflags=cflags(opts, kernel_layout(kernel.btf()), []) + [f"-DTARGET_DEV={gmem_superblock_dev()}"])
    return b, RingReader(b["folio_events"].get_fd(), ring_pages * mmap.PAGESIZE, EVENT_SIZE)


def folio_lost(b) -> int:
    """Per-folio records the ring had no room for (counted in BPF, all CPUs)."""
    t = b["luo_counters"]
    return int(sum(t[t.Key(COUNTER_NAMES.index("folio_lost"))]))


SYSCALLS = r"""
BPF_ARRAY(n, u64, 1);
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
	int k = 0;
	u64 *v;
	if ((bpf_get_current_pid_tgid() >> 32) != CONSUMER)
		return 0;
	v = n.lookup(&k);
	if (v)
		__sync_fetch_and_add(v, 1);
	return 0;
}
"""


def ctx_switches() -> Tuple[int, int]:
    """(voluntary, involuntary) context switches of this process: a
    voluntary one is a sleep, and so one wakeup."""
    vol = inv = 0
    for line in open("/proc/self/status"):
        if line.startswith("voluntary_ctxt_switches:"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            inv = int(line.split()[1])
    return vol, inv


def run_once(tmp: str, total: int, rate: float, producers: int = 1,
             ring_pages: int = Options.folio_ringbuf_pages, batch_s: float = ringbuf.BATCH_S) -> dict:
    """One run: records received and lost, the producers' seconds, the
    consumer's CPU seconds, and where that CPU went: drains, decode,
    aggregator, recording; wakeups (sleeps) and system calls."""
    from bcc import BPF
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(total // producers), str(rate / producers)],
                              cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(producers)]
    old = ringbuf.BATCH_S
    ringbuf.BATCH_S = batch_s
    try:
        for p in procs:
            p.stdout.readline()  # its guest_memfd exists
        b, ring = load_harness(ring_pages)
        sc = BPF(text=SYSCALLS, cflags=[f"-DCONSUMER={os.getpid()}"])
        ep = select.epoll()
        ep.register(ring.fd, select.EPOLLIN)
        agg = Aggregator("trace")
        w = rec.Writer(os.path.join(tmp, "ingest.luo"), {"format": "luotrace.recording", "mode": "trace"}, force=True)
        stage = {"drain": 0.0, "decode": 0.0, "aggregator": 0.0, "recording": 0.0}
        batches = 0
        clock = time.perf_counter
        vol0, inv0 = ctx_switches()
        sc0 = int(sc["n"][sc["n"].Key(0)].value)
        cpu0 = time.process_time()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        while True:
            t0 = clock()
            raw = ring.consume()
            t1 = clock()
            stage["drain"] += t1 - t0
            if raw:
                batches += 1
                w.add(raw)
                t2 = clock()
                ev = decode(raw)
                t3 = clock()
                agg.feed(ev)
                t4 = clock()
                stage["recording"] += t2 - t1
                stage["decode"] += t3 - t2
                stage["aggregator"] += t4 - t3
            elif all(p.poll() is not None for p in procs):
                if not ring.consume():  # the last records, then the end
                    break
                continue
            ringbuf.wait(ep, bool(raw), 0.05)
        cpu = time.process_time() - cpu0
        vol, inv = ctx_switches()
        syscalls = int(sc["n"][sc["n"].Key(0)].value) - sc0
        seconds = max(float(p.stdout.read().strip() or 0) for p in procs)
        w.close({}, {})
        lost = folio_lost(b)
        ring.close()
        ep.close()
        b.cleanup()
        sc.cleanup()
        got = agg.per_folio_received
        return {"got": got, "lost": lost, "seconds": seconds, "cpu": cpu, "batches": batches, "stage": stage,
                "wakeups": vol - vol0, "preempted": inv - inv0, "syscalls": syscalls}
    finally:
        ringbuf.BATCH_S = old
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _row(label: str, r: dict) -> List[str]:
    got, secs, cpu = r["got"], r["seconds"], r["cpu"]
    achieved = got / secs if secs else 0.0
    per = {k: v / got * 1e6 if got else 0.0 for k, v in r["stage"].items()}
    rest = cpu / got * 1e6 - sum(per.values()) if got else 0.0
    return [f"  {label:<30} {got:>9,} received, {r['lost']:>7,} lost: {achieved / 1e6:5.2f} M records/s over "
            f"{secs:5.2f} s; consumer {cpu / secs * 100 if secs else 0:.0f} % of a core = capacity "
            f"{got / cpu / 1e6 if cpu else 0:.2f} M records/s per core",
            f"  {'':<30} {got / max(1, r['batches']):,.0f} records a batch, {r['wakeups'] / secs if secs else 0:,.0f} "
            f"wakeups/s, {r['syscalls'] / secs if secs else 0:,.0f} system calls/s; us a record: "
            + ", ".join(f"{k} {v:.3f}" for k, v in per.items()) + f", loop and kernel {rest:.3f}"]


def ingest(tmp: str) -> List[str]:
    total = 4096 * 1024  # 4.2 M records
    rows = ["live ingest, trace mode (ring buffer -> decode -> aggregator -> recording; bench-only source on the "
            f"page-cache tracepoint; per-folio ring {Options.folio_ringbuf_pages} pages unless said); baseline: "
            "the consumer as it was (no pause between drains):"]
    default = Options.folio_ringbuf_pages
    for rate, producers, pages, label in ((1.0e6, 1, default, "offered 1 M/s"), (0.0, 1, default, "unpaced, 1 writer"),
                                          (0.0, 2, default, "unpaced, 2 writers")):
        base = run_once(tmp, total, rate, producers, pages, batch_s=0.0)
        new = run_once(tmp, total, rate, producers, pages)
        rows += _row(f"{label}, baseline", base) + _row(f"{label}, paced {ringbuf.BATCH_S * 1e3:g} ms", new)
        cap = [r["got"] / r["cpu"] if r["cpu"] else 0.0 for r in (base, new)]
        rows.append(f"  {'':<30} capacity per core paced / baseline: {cap[1] / cap[0] if cap[0] else 0:.2f}x")
        print(f"  ingest {label} done", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        print("\n".join(ingest(d)))
