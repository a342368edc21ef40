"""Time to ready and an idle agent's footprint (part of `make bench`):

- record --model and serve --model: seconds from the process start to
  "tracing" (record's stderr line) or /-/ready 200 (serve): cold (no programs
  kept from an earlier start, page cache dropped: BCC, LLVM and the kernel
  headers read from disk), nothing changed since the last start (the
  programs it kept are opened, tracer/attach/bpf_cache.py), and compiling with the
  page cache warm (LUOTRACE_BPF_CACHE=0, what every start cost before);
  medians of REPS; the same run's baseline is the interpreter importing
  luotrace's CLI (`luotrace --version`);
- serve idle after attach: RSS (anonymous, file-backed, total) and CPU per
  idle hour, against the agent targets (48 MB anonymous, 96 MB total).

    python -m tests.bench_ready   (root)
"""
from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List, Optional

from tracer.attach import bpf_cache
from tracer.live.runner import KEXEC_FAST_S

from .bench import MODEL, REPO, _cpu_s, _free_port

REPS = int(os.environ.get("LUOTRACE_BENCH_REPS", "3"))
CLI = [sys.executable, "-m", "tracer.cli"]


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _baseline() -> float:
    t = time.perf_counter()
    subprocess.run(CLI + ["--version"], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - t


def _record_ready(tmp: str, env: Optional[Dict[str, str]] = None) -> float:
    out = os.path.join(tmp, "ready.luo")
    t = time.perf_counter()
    p = subprocess.Popen(CLI + ["record", "--model", MODEL, "-o", out, "--force", "--quiet", "--duration", "120"],
                         cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=dict(os.environ, **(env or {})))
    try:
        while "luotrace: tracing" not in (line := p.stderr.readline()):
            if not line:
                raise RuntimeError("record ended before tracing")
        return time.perf_counter() - t
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)


def _serve(port: int, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    return subprocess.Popen(CLI + ["serve", "--listen", f"127.0.0.1:{port}", "--model", MODEL], cwd=REPO,
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))


def _wait_ready(port: int, t: float, p: subprocess.Popen) -> float:
    while True:
        if p.poll() is not None:
            raise RuntimeError("serve ended before ready")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200:
                return time.perf_counter() - t
        except OSError:
            pass
        time.sleep(0.01)


def _serve_ready(env: Optional[Dict[str, str]] = None) -> float:
    port = _free_port()
    t = time.perf_counter()
    p = _serve(port, env)
    try:
        return _wait_ready(port, t, p)
    finally:
        p.terminate()
        p.wait(60)


def _status(pid: int) -> Dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0]) >> 10  # MiB
    return out


def footprint(tmp: str, idle_s: float = 30.0) -> List[str]:
    """serve --model's memory once attached, then after an update of 64
    files and 20 scrapes, and its CPU while idle."""
    port = _free_port()
    t = time.perf_counter()
    p = _serve(port)
    try:
        _wait_ready(port, t, p)
        time.sleep(2)
        idle = _status(p.pid)
        c0 = _cpu_s(p.pid)
        time.sleep(idle_s)
        cpu_before = _cpu_s(p.pid) - c0
        files = ",".join(["gmem:256K"] * 32 + ["memfd:256K"] * 32)
        subprocess.run([MODEL, "--json", os.path.join(tmp, "fp.json"), f"kexec:{files}"], check=True,
                       capture_output=True)
        for _ in range(20):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        time.sleep(KEXEC_FAST_S + 2)  # the model's kexec record: a kexec that never comes
        c0 = _cpu_s(p.pid)
        time.sleep(idle_s)
        cpu = _cpu_s(p.pid) - c0
        used = _status(p.pid)
    finally:
        p.terminate()
        p.wait(60)
    rows = []
    for what, st in (("idle after attach", idle), ("after an update of 64 files and 20 scrapes", used)):
        rows.append(f"serve --model {what}: RSS {st['VmRSS']} MiB (anonymous {st['RssAnon']}, file {st['RssFile']}, "
                    f"peak {st['VmHWM']}); targets 48 anonymous / 96 total: ratios {st['RssAnon'] / 48:.2f} / "
                    f"{st['VmRSS'] / 96:.2f}")
    for what, c in (("before any update", cpu_before), ("after it (64 files held)", cpu)):
        rows.append(f"serve --model idle CPU {what}: {c * 3600 / idle_s:.1f} CPU-s per idle hour "
                    f"({100 * c / idle_s:.2f} % of one CPU)")
    return rows


def _forget_kept() -> None:
    """No programs kept from an earlier start (tracer/attach/bpf_cache.py): as after a boot."""
    shutil.rmtree(bpf_cache.PIN_ROOT, ignore_errors=True)
    shutil.rmtree(bpf_cache.META_DIR, ignore_errors=True)


def ready(tmp: str) -> List[str]:
    base = statistics.median(_baseline() for _ in range(REPS))
    rows = [f"time to ready (medians of {REPS}; baseline: the CLI's imports alone, `luotrace --version`, {base:.2f} s; "
            "target 1 s when nothing changed since the last start)"]
    off = {bpf_cache.ENV: "0"}
    for name, fn in (("record --model", lambda env=None: _record_ready(tmp, env)), ("serve --model", _serve_ready)):
        cold, compiled, kept = [], [], []
        for _ in range(REPS):
            _forget_kept()
            _drop_caches()
            cold.append(fn())  # compiles (BCC, LLVM, headers read from disk), then keeps the programs
            kept.append(fn())  # nothing changed: opens the kept programs
            compiled.append(fn(off))  # page cache warm, compiling as every start did before
        c, w, k = (statistics.median(x) for x in (cold, compiled, kept))
        rows.append(f"  {name:<15} cold {c:5.2f} s ({c / base:4.1f}x baseline)   compiling, warm {w:5.2f} s   "
                    f"nothing changed {k:5.2f} s ({k / base:4.1f}x baseline, {k:.2f}x the 1 s target)")
    return rows


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench_ready: run as root")
    import tempfile
    with tempfile.TemporaryDirectory(prefix="luotrace-ready-") as tmp:
        print("\n".join(ready(tmp) + footprint(tmp)))


if __name__ == "__main__":
    main()
