"""A live tracing run: attach, optionally run a command, stream events into the
recording and the aggregator, stop on command exit / duration / SIGINT /
SIGTERM, detach cleanly, and build the report.

The tracer must never harm the run it observes: maps and the ring buffer are
bounded, lost events are counted in BPF and reported, and probes are detached
on every exit path (a second Ctrl-C during cleanup is ignored).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from . import __version__, kernel
from . import recording as rec
from .aggregator import Aggregator
from .errors import LuotraceError
from .events import EVENT_SIZE, decode
from .layout import Layout, kernel_layout, model_layout
from .loader import Options, Tracer
from .report import build


@dataclass
class RunResult:
    report: dict
    recording: Optional[str]
    command_rc: Optional[int] = None
    stopped_by: str = ""


def check_environment(opts: Options) -> None:
    """Fail early, one line each, on what would make the run impossible."""
    kernel.require_root()
    if opts.model is not None:
        if not os.path.isfile(opts.model):
            raise LuotraceError(f"model binary {opts.model} not found",
                                "build it with `make model` or pass the right --model path")
        if not os.access(opts.model, os.X_OK):
            raise LuotraceError(f"model binary {opts.model} is not executable", "rebuild it with `make model`")
    else:
        kernel.require_btf()
    headers = f"/lib/modules/{kernel.release()}/build"
    if not os.path.exists(headers) and not os.path.exists("/sys/kernel/kheaders.tar.xz"):
        raise LuotraceError(f"no kernel headers for {kernel.release()} ({headers} missing): BCC needs them to compile",
                            "run `make setup` (links Debian's linux-headers tree) or load the kheaders module")


def resolve_layout(opts: Options) -> Layout:
    if opts.model is not None:
        return model_layout(opts.model)
    from .btf import BTF, BTFError
    try:
        return kernel_layout(BTF.from_file(kernel.btf_path()))
    except BTFError as e:
        raise LuotraceError(f"kernel BTF unusable: {e}", "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y") from None


def make_header(opts: Options, tracer: Tracer, labels: Dict[str, str], base_ns: int, real_ns: int) -> dict:
    return {
        "format": "luotrace.recording",
        "luotrace_version": __version__,
        "kernel": kernel.release(),
        "hostname": socket.gethostname(),
        "mode": opts.mode,
        "target": f"model:{os.path.abspath(opts.model)}" if opts.model else "kernel",
        "labels": labels,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(real_ns / 1e9)),
        "clock": {"base_monotonic_ns": base_ns, "base_realtime_ns": real_ns, "source": "CLOCK_MONOTONIC"},
        "probes": [s.to_json() for s in tracer.statuses],
        "layout": tracer.layout.to_json(),
        "sample_every": opts.sample_every,
        "ringbuf_pages": opts.ringbuf_pages,
        "folio_ringbuf_pages": opts.folio_ringbuf_pages,
        "event_size": EVENT_SIZE,
    }


class _Stop:
    """SIGINT/SIGTERM handlers that ask the loop to stop, once."""

    def __init__(self) -> None:
        self.reason = ""
        self._old: Dict[int, object] = {}

    def __enter__(self) -> "_Stop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, _frame) -> None:
        if not self.reason:
            self.reason = signal.Signals(signum).name

    def quiet(self) -> None:
        """During cleanup further signals are ignored (no half-detached state)."""
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


def run(opts: Options, output: Optional[str], command: Optional[List[str]] = None,
        duration: Optional[float] = None, labels: Optional[Dict[str, str]] = None,
        progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
        ready: Optional[Callable[[], None]] = None) -> RunResult:
    check_environment(opts)
    layout = resolve_layout(opts)
    labels = labels or {}
    agg = Aggregator(opts.mode)
    pending: List[bytes] = []
    writer: Optional[rec.Writer] = None

    def on_bytes(raw: bytes) -> None:
        pending.append(raw)

    def pump() -> None:
        if not pending:
            return
        raw = b"".join(pending)
        pending.clear()
        if writer is not None:
            writer.add(raw)
        agg.feed(decode(raw))

    base_ns = time.monotonic_ns()
    real_ns = time.time_ns()
    agg.base = base_ns
    prev_stats = kernel.set_bpf_stats(True)
    child: Optional[subprocess.Popen] = None
    stopped_by = ""
    with _Stop() as stop:
        try:
            try:
                tracer = Tracer(opts, layout, on_bytes)
            except LuotraceError:
                raise
            except Exception as e:  # BCC compile or load failure
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise LuotraceError(f"loading the BPF programs failed: {first}",
                                    "run `luotrace doctor`; `make setup` installs headers and BCC") from None
            with tracer:
                header = make_header(opts, tracer, labels, base_ns, real_ns)
                if output:
                    writer = rec.Writer(output, header)
                attached = sum(1 for s in tracer.statuses if s.status == "attached")
                progress(f"luotrace: tracing {attached} probes in {opts.mode} mode"
                         f"{' on ' + opts.model if opts.model else ''}; Ctrl-C to stop")
                if ready:
                    ready()
                if command:
                    try:
                        child = subprocess.Popen(command)
                    except OSError as e:
                        raise LuotraceError(f"cannot run {command[0]}: {e.strerror}", "check the command after --")
                deadline = time.monotonic() + duration if duration else None
                last_note = time.monotonic()
                while True:
                    tracer.poll(100)
                    pump()
                    if stop.reason:
                        stopped_by = stop.reason
                        break
                    if child is not None and child.poll() is not None:
                        stopped_by = "command exited"
                        break
                    if deadline and time.monotonic() >= deadline:
                        stopped_by = "duration"
                        break
                    if time.monotonic() - last_note >= 10:
                        last_note = time.monotonic()
                        progress(f"luotrace: {agg.received} events so far, "
                                 f"{tracer.counters()['lost']} lost")
                stop.quiet()
                if child is not None and child.poll() is None:
                    child.send_signal(signal.SIGTERM if stopped_by == "SIGTERM" else signal.SIGINT)
                    try:
                        child.wait(5)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
                tracer.drain()
                pump()
                maps = tracer.dump_maps()
                progs = tracer.prog_stats()
                progress("luotrace: detaching...")
            end = {
                "stopped_by": stopped_by,
                "duration_ns": time.monotonic_ns() - base_ns,
                "bpf": {"run_time_ns": sum(p["run_time_ns"] for p in progs.values()),
                        "run_cnt": sum(p["run_cnt"] for p in progs.values()),
                        "stats_enabled": prev_stats is not None, "programs": progs},
                "records": agg.received,
            }
            if writer is not None:
                writer.close(maps, end)
                writer = None
        finally:
            kernel.restore_bpf_stats(prev_stats)
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
            if writer is not None:  # error path: keep what was recorded
                writer.flush()
    agg.finish(maps)
    report = build(agg, header, end)
    return RunResult(report, output, child.returncode if child else None, stopped_by)


def replay(path: str) -> dict:
    """The report of a recording: exactly what the live run showed."""
    return report_of(rec.read(path))


def report_of(r: rec.Recording) -> dict:
    try:
        return _report_of(r)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise LuotraceError(f"recording content is corrupt ({type(e).__name__}: {e})",
                            "the file was damaged after it was written; record again") from None


def _report_of(r: rec.Recording) -> dict:
    agg = Aggregator(r.header.get("mode", "folio"), r.header.get("clock", {}).get("base_monotonic_ns", 0))
    for batch in r.batches():
        agg.feed(batch)
    agg.finish(r.maps)
    return build(agg, r.header, r.end, r.truncated, r.truncated_reason)
