"""luotrace top's cost (part of `make bench`; alone: `python -m tests.bench_top`).

- a frame of 1,000 files (the view built from a report, then drawn for a
  full screen), against the 20 ms target, and against the baseline of the same
  run: decoding that report from JSON (what one request to serve costs top);
- top attached to a live serve and idle (probes attached, no update), for
  10 s: its CPU, against the 1 % of one CPU target.
"""
from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from typing import List

from exporters import top_text as tt
from tests.bench import MODEL, REPO, _cpu_s, _free_port
from tracer.analysis import progress as pg

FILE = {"handler": "guest_memfd", "dev": 16, "session": 1, "token": 1, "size_bytes": 64 << 20, "result": "none",
        "nr_folios": 16384, "folios_preserved": 0, "folios_restored": 0, "errno": None, "failed_phase": None,
        "anomalies": [], "phases": [{"name": "count_pass", "start_ns": 0, "duration_ns": 9000, "count": 16384}],
        "in_progress": ["gmem_preserve", "gmem_walk"], "in_progress_since_ns": {"gmem_preserve": 0, "gmem_walk": 10}}


def frame_cost() -> List[str]:
    files = []
    for i in range(1000):
        f = copy.deepcopy(FILE)
        f.update(inode=1000 + i, token=i, session=i % 40)
        if i % 2:  # half finished: preserved, waiting for the kexec
            f.update(result="ok", in_progress=[], in_progress_since_ns={}, folios_preserved=16384)
            f.pop("in_progress_since_ns")
        files.append(f)
    rep = {"recording": {"mode": "folio", "kernel": "k"}, "files": files, "events": {"lost": 0},
           "sessions": [{"id": s, "blackout_start_ns": None, "blackout_ns": None, "files": [], "cancelled": False}
                        for s in range(40)], "bpf": {"run_cnt": 10, "run_time_ns": 1000}}
    hist = pg.History.of([{"files": [{"handler": "guest_memfd", "phases": [
        {"name": "fill_pass", "start_ns": 0, "duration_ns": 4_000_000, "count": 16384}]}]}])
    blob = json.dumps(rep)
    frames, decodes = [], []
    prev = None
    for i in range(30):
        t0 = time.perf_counter()
        json.loads(blob)
        decodes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        prev = pg.view(rep, 1_000_000 + i * 1_000_000, hist, prev)
        tt.screen(prev, tt.Screen(), 200, 60)
        frames.append(time.perf_counter() - t0)
    f, d = statistics.median(frames), statistics.median(decodes)
    return [f"top: a frame of 1,000 files (view + full screen) {1e3 * f:.2f} ms median; ratio to the 20 ms target "
            f"{f / 0.020:.2f}; {f / d:.1f} x decoding the same report from JSON ({1e3 * d:.2f} ms, the request's share)"]


def join_cost(tmp: str) -> List[str]:
    """In the new kernel, a frame joins this run with the old kernel's
    recording: kept current (LiveJoin: the old side fed once) against
    reading both recordings again (join_report: the baseline, what each
    frame cost before), for an update of 1,000 files in folio mode."""
    import os

    from tests.test_top import _split_at_the_retrieves
    from tracer.analysis.join import LiveJoin, join_report
    from tracer.analysis.simulate import SimSpec, simulate
    from tracer.recording import format as rec
    src = os.path.join(tmp, "update.luo")
    simulate(SimSpec(files=1000, size=64 << 20, mode="folio", seed=3), src, force=True)
    before, after = _split_at_the_retrieves(src, _Dir(tmp))
    join = LiveJoin(before, rec.read(after).header, after)
    join.catch_up()
    kept, again = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        join.report(None)
        kept.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        join_report([before, after])
        again.append(time.perf_counter() - t0)
    k, a = statistics.median(kept), statistics.median(again)
    return [f"top in the new kernel, a frame of a 1,000-file update joined: kept current {1e3 * k:.0f} ms, "
            f"both recordings read again {1e3 * a:.0f} ms (ratio {k / a:.2f})"]


class _Dir(str):
    """A directory path that joins like pytest's tmp_path (the split helper's argument)."""

    def __truediv__(self, name: str) -> str:
        import os
        return os.path.join(self, name)


def idle_cost(seconds: float = 10.0) -> List[str]:
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "tracer.cli", "serve", "--listen", f"127.0.0.1:{port}", "--model",
                              MODEL], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        while "metrics on" not in (serve.stderr.readline() or "metrics on"):
            pass
        top = subprocess.Popen([sys.executable, "-m", "tracer.cli", "top", "--from", f"http://127.0.0.1:{port}",
                                "--plain", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)  # past its start (imports)
            c0, s0 = _cpu_s(top.pid), _cpu_s(serve.pid)
            time.sleep(seconds)
            pct = 100 * (_cpu_s(top.pid) - c0) / seconds
            served = 100 * (_cpu_s(serve.pid) - s0) / seconds
        finally:
            top.terminate()
            top.wait(30)
    finally:
        serve.terminate()
        serve.wait(60)
    return [f"top beside an idle serve, a frame a second: {pct:.2f} % of one CPU (target 1 %: ratio {pct:.2f}); "
            f"serve answering its one request a frame: {served:.2f} %"]


def main() -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(frame_cost() + join_cost(tmp) + idle_cost()))


if __name__ == "__main__":
    main()
