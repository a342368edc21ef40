"""Soak benchmark of `luotrace serve` as a service (`make soak`, 30 minutes;
`make bench` runs 3): the reference model preserves and retrieves files in
a loop while one scraper scrapes once a second.  Printed: RSS and scrape
time in the first and last minute (ratio) and their slope over the run
after the first fifth (a bounded service is flat); then 20 concurrent
scrapers (p50/p99 against one scraper's median, same run) and a burst of
1,000 connections (how many answered).

    python -m tests.bench_soak [MINUTES]
"""
from __future__ import annotations

import asyncio
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import List, Tuple

import numpy as np

from tests.conftest import LUOTRACE, MODEL, REPO

RUN = ["kexec:gmem:1M,memfd:512K", "cancel:gmem:512K", "discard:gmem:256K"]
FILES_PER_RUN = sum(len(r.split(":", 1)[1].split(",")) for r in RUN)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _scrape_ms(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
    return (time.perf_counter() - t) * 1e3


def _model_loop(stop: threading.Event, counter: List[int]) -> None:
    while not stop.is_set():
        subprocess.run([MODEL, *RUN], capture_output=True, check=True)
        counter[0] += 1


def concurrent_scrapes(port: int, scrapers: int, each: int) -> List[float]:
    """SCRAPERS clients at once, each scraping EACH times in a row: the
    latency of every scrape in ms.  asyncio on raw sockets, so that the
    clients' own Python overhead does not queue behind a GIL."""
    async def scraper() -> List[float]:
        out = []
        for _ in range(each):
            t = time.perf_counter()
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            await w.drain()
            await r.read()
            w.close()
            out.append((time.perf_counter() - t) * 1e3)
        return out

    async def all_() -> list:
        return await asyncio.gather(*(scraper() for _ in range(scrapers)))
    return [ms for one in asyncio.run(all_()) for ms in one]


def burst(port: int, n: int) -> int:
    """Open N connections at once, each asking for /metrics: how many got a 200."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, n + 256), hard), hard))

    async def one() -> bool:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await w.drain()
        body = await asyncio.wait_for(r.read(), 60)
        w.close()
        return body.startswith(b"HTTP/1.0 200")

    async def all_() -> list:
        return await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    return sum(1 for x in asyncio.run(all_()) if x is True)


def _slope_per_min(t_s: np.ndarray, y: np.ndarray) -> float:
    keep = t_s >= t_s.max() / 5
    return float(np.polyfit(t_s[keep] / 60, y[keep], 1)[0]) if keep.sum() > 2 else 0.0


def soak(minutes: float) -> List[str]:
    with tempfile.TemporaryDirectory(prefix="luotrace-soak-") as tmp:
        port = 19000 + os.getpid() % 1000
        url = f"http://127.0.0.1:{port}/metrics"
        serve = subprocess.Popen(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{port}", "--model", MODEL,
                                             "-o", os.path.join(tmp, "soak.luo")],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while "metrics on" not in (line := serve.stderr.readline()):
            if not line:
                sys.exit("soak: serve exited: " + serve.stderr.read())
        stop, runs = threading.Event(), [0]
        loop = threading.Thread(target=_model_loop, args=(stop, runs), daemon=True)
        loop.start()
        samples: List[Tuple[float, float, float]] = []  # (t, scrape ms, rss MB)
        t0 = time.monotonic()
        next_report = 60.0
        while (el := time.monotonic() - t0) < minutes * 60:
            samples.append((el, _scrape_ms(url), _rss_mb(serve.pid)))
            if el >= next_report:
                print(f"  soak {el / 60:.0f}/{minutes:g} min: {runs[0]} model runs, "
                      f"RSS {samples[-1][2]:.0f} MB, scrape {samples[-1][1]:.1f} ms", file=sys.stderr, flush=True)
                next_report += 60
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - el)))
        stop.set()
        loop.join()
        single = [_scrape_ms(url) for _ in range(40)]
        conc = concurrent_scrapes(port, 20, 25)
        answered = burst(port, 1000)
        tracked = [ln for ln in urllib.request.urlopen(url).read().decode().splitlines()
                   if ln.startswith("luotrace_files_tracked")]
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=120)
    a = np.array(samples)
    t, ms, rss = a[:, 0], a[:, 1], a[:, 2]
    first, last = t < 60, t >= t.max() - 60
    return [
        f"serve soak {minutes:g} min: {runs[0]} model runs ({runs[0] * FILES_PER_RUN} files traced), "
        f"{len(samples)} scrapes, {tracked[0] if tracked else ''}",
        f"  RSS     first minute {np.median(rss[first]):6.1f} MB  last minute {np.median(rss[last]):6.1f} MB  "
        f"ratio {np.median(rss[last]) / np.median(rss[first]):.3f}  slope {_slope_per_min(t, rss):+.3f} MB/min",
        f"  scrape  first minute {np.median(ms[first]):6.2f} ms  last minute {np.median(ms[last]):6.2f} ms  "
        f"ratio {np.median(ms[last]) / np.median(ms[first]):.3f}  slope {_slope_per_min(t, ms):+.3f} ms/min",
        f"  20 concurrent scrapers: p50 {np.percentile(conc, 50):.1f} ms, p99 {np.percentile(conc, 99):.1f} ms "
        f"(one scraper's median {statistics.median(single):.1f} ms: p99 ratio "
        f"{np.percentile(conc, 99) / statistics.median(single):.1f})",
        f"  burst of 1000 connections: {answered} answered",
    ]


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("soak: run as root (make soak)")
    for row in soak(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0):
        print(row)
