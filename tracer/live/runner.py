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
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, TypeVar

import numpy as np

from tracer.kernel import clock
from tracer.attach import footprint
from tracer.kernel import host as kernel
from tracer.recording import format as rec
from tracer.recording import header
from tracer.analysis.aggregator import Aggregator
from tracer.analysis.join import LiveJoin, join_report
from tracer.probes.catalog import PROBE_IDS
from tracer.base.errors import LuotraceError
from tracer.base.output import check_output
from tracer.probes.events import decode
from tracer.kernel.backing import BACKING_ENV
from tracer.probes.layout import resolve_layout
from tracer.probes.plan import Options
from tracer.attach.tracer import Tracer
from tracer.analysis.report import build, file_rows, retire
from tracer.live.stop import StopSignals


KEXEC_PROBE = PROBE_IDS["kexec"]
POPULATION_LINGER = 5.0  # s the population tracepoints stay after the last file left an update


@dataclass
class RunResult:
    report: dict
    recording: Optional[str]
    command_rc: Optional[int] = None
    stopped_by: str = ""
    recording_error: Optional[str] = None  # why the recording stopped early (the report is whole)


def check_environment(opts: Options) -> None:
    """Fail early, one line each, on what would make the run impossible."""
    kernel.require_root()
    if opts.model is not None:
        if not os.path.isfile(opts.model):
            raise LuotraceError(f"model binary {opts.model} not found",
                                "build it with `make model` or pass the right --model path")
        if not os.access(opts.model, os.X_OK):
            raise LuotraceError(f"model binary {opts.model} is not executable", "rebuild it with `make model`")
        with open(opts.model, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise LuotraceError(f"model binary {opts.model} is not an ELF executable",
                                    "pass the reference model built by `make model`")
    else:
        kernel.require_btf()
    headers = f"/lib/modules/{kernel.release()}/build"
    if not os.path.exists(headers) and not os.path.exists("/sys/kernel/kheaders.tar.xz"):
        raise LuotraceError(f"no kernel headers for {kernel.release()} ({headers} missing): BCC needs them to compile",
                            "run `make setup` (links Debian's linux-headers tree) or load the kheaders module")


def make_header(opts: Options, tracer: Tracer, labels: Dict[str, str], base_ns: int, real_ns: int) -> dict:
    return header.build(
        kernel=kernel.release(), hostname=socket.gethostname(), mode=opts.mode,
        target=f"model:{os.path.abspath(opts.model)}" if opts.model else "kernel", labels=labels,
        base_ns=base_ns, real_ns=real_ns, clock_source="CLOCK_MONOTONIC",
        probes=[s.to_json() for s in tracer.statuses],
        # what the guest_memfd files are (real, or stand-ins and why) and the
        # superblock the population probes watch
        gmem={**tracer.backing.to_json(), "dev": tracer.gmem_dev},
        layout=tracer.layout.to_json(), sample_every=opts.sample_every,
        ringbuf_pages=opts.lifecycle_ringbuf_pages, folio_ringbuf_pages=opts.folio_ringbuf_pages)


KEXEC_FAST_S = 10.0
# The TSC rate a join needs comes from two clock anchors at least 0.1 s apart
# (clock.tsc_per_ns): the first is taken when a LiveRun is made (before it
# resolves the layout, plans and loads anything), the second once the
# programs are attached; a start that compiles nothing may wait out the rest.
ANCHOR_GAP_S = 0.15


class LiveRun:
    """One live tracing run.  The poll loop feeds the aggregator; ``snapshot``
    may be called from another thread (a metrics scrape) at any time."""

    def __init__(self, opts: Options, output: Optional[str], labels: Optional[Dict[str, str]] = None,
                 force: bool = False):
        self._anchor0 = clock.anchor()  # first: see ANCHOR_GAP_S
        check_environment(opts)
        self.opts = opts
        self.output = output
        self.force = force
        self.recording_error: Optional[str] = None
        self.layout = resolve_layout(opts.model)
        self.labels = labels or {}
        self.agg = Aggregator(opts.mode)
        self.lock = threading.Lock()
        self._pending: List[bytes] = []
        self.writer: Optional[rec.Writer] = None
        self.tracer: Optional[Tracer] = None
        self.header: dict = {}
        self.final: Optional[dict] = None
        self.stats: Optional[kernel.BpfStats] = None
        self.kexec_seen = False
        self._kexec_at = 0.0  # monotonic time of the kexec record
        # called once, in the polling thread, when kernel_kexec() is seen and the
        # maps are dumped: the last moment the old kernel's numbers can leave it
        self.on_kexec: List[Callable[["LiveRun"], None]] = []
        # called with each batch of records as the aggregator gets it, under
        # the lock (top in the new kernel: a join kept current)
        self.on_batch: List[Callable[[np.ndarray], None]] = []
        self._maps_at = 0.0
        self._maps_mark = 0  # lifecycle records received when the maps were last written
        self._busy_at = 0.0  # when a file was last seen in an update ("update" population policy)
        self.progress: Callable[[str], None] = lambda s: None
        # starting (compiling, attaching) -> tracing (every probe attached and
        # the first poll done: an update from now on is seen) -> detaching ->
        # stopped.  Hooks hear each change (serve: readiness, sd_notify).
        self.state = "starting"
        self.on_state: List[Callable[[str], None]] = []

    def set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        for hook in self.on_state:
            hook(state)

    def _on_bytes(self, raw: bytes) -> None:
        self._pending.append(raw)

    def _write(self, what: Callable[["rec.Writer"], None]) -> None:
        """One write to the recording.  The first failure (a full disk, an I/O
        error) ends the recording, not the run: the traced command must not pay
        for it, and the report stays whole; what was lost is said once."""
        if self.writer is None:
            return
        try:
            what(self.writer)
        except OSError as e:
            self.recording_error = (f"{e.strerror or e} after {self.writer.records} records: "
                                    f"the recording is cut there, the report is complete")
            self.writer.abandon()
            self.writer = None

    def pump(self) -> None:
        if not self._pending:
            return
        raw = b"".join(self._pending)
        self._pending.clear()
        batch = decode(raw)
        with self.lock:
            jump = not self.kexec_seen and bool((batch["probe"] == KEXEC_PROBE).any())
            self._write(lambda w: w.add(raw))
            if self.kexec_seen or jump:
                # The machine is jumping to the next kernel: what is not on
                # disk now is lost.  Written through before any Python work.
                self._write(lambda w: w.flush(sync=True))
            self.kexec_seen = self.kexec_seen or jump
            if jump:
                self._kexec_at = time.monotonic()
            self.agg.feed(batch)
            for view in list(self.on_batch):
                try:
                    view(batch)
                except Exception as e:  # a view's failure must not end the trace: it is dropped
                    self.on_batch.remove(view)
                    print(f"luotrace: a view of the records failed and was dropped: {e}", file=sys.stderr)
        if jump:
            # LUO freezes every session right after kernel_kexec(): take those
            # events first, then the folio counters held in BPF maps (slower).
            self.bpf.drain()
            self.pump()
            with self.lock:
                self._dump_maps(sync=True)
            for hook in self.on_kexec:
                try:
                    hook(self)
                except Exception as e:  # an exporter's failure must not end the trace
                    print(f"luotrace: at the kexec: {e}", file=sys.stderr)

    def _lifecycle_records(self) -> int:
        return self.agg.received - self.agg.per_folio_received

    def _dump_maps(self, sync: bool = False) -> None:
        """Write the BPF maps into the recording now.  Done a second after
        lifecycle activity as well as at the kexec: the jump may come too fast
        for the recorder, and the per-file folio counts live only in the maps."""
        self._maps_mark = self._lifecycle_records()
        self._maps_at = time.monotonic()
        maps = self.bpf.dump_maps()
        self._write(lambda w: w.write_maps(maps, sync=sync))

    def start(self, before_compile: Callable[[], None] = lambda: None) -> None:
        anchor0 = self._anchor0
        base_ns, real_ns = time.monotonic_ns(), time.time_ns()
        self.agg.base = base_ns
        self.stats = kernel.BpfStats()
        try:
            self.tracer = _in_thread(lambda: Tracer(self.opts, self.layout, self._on_bytes, before_compile))
        except LuotraceError:
            raise
        except Exception as e:  # BCC compile or load failure
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LuotraceError(f"loading the BPF programs failed: {first}",
                                "run `luotrace doctor`; `make setup` installs headers and BCC") from None
        self.header = make_header(self.opts, self.tracer, self.labels, base_ns, real_ns)
        # programs kept by the last start take no compile: the anchors still need ANCHOR_GAP_S between them
        time.sleep(max(0.0, ANCHOR_GAP_S - (time.monotonic_ns() - anchor0["monotonic_ns"]) / 1e9))
        self.header["clock"].update(boot_id=clock.boot_id(), anchors=[anchor0, clock.anchor()])
        if self.output:
            self.writer = rec.Writer(self.output, self.header, force=self.force)

    @property
    def bpf(self) -> Tracer:
        """The loaded programs (after start)."""
        if self.tracer is None:
            raise RuntimeError("the live run has not started")
        return self.tracer

    def attached(self) -> int:
        return sum(1 for s in self.tracer.statuses if s.status == "attached") if self.tracer else 0

    def poll(self, timeout_ms: int = 100) -> None:
        # the last records before the jump are polled for every millisecond;
        # a kexec that has not happened KEXEC_FAST_S later failed or never
        # comes (the model's): back to the normal poll, not a busy loop
        fast = self.kexec_seen and time.monotonic() - self._kexec_at < KEXEC_FAST_S
        self.bpf.poll(1 if fast else timeout_ms)
        self.pump()
        self._population()
        if self.state == "starting":
            footprint.release_compiler()  # the programs are in the kernel: the compiler is not needed
            self.set_state("tracing")
        if self.writer is not None:
            with self.lock:
                self._write(lambda w: w.maybe_flush())
                # a lifecycle record since the last dump: per-file counters may have moved
                if self.writer is not None and self._lifecycle_records() != self._maps_mark and \
                        time.monotonic() - self._maps_at >= rec.FLUSH_SECONDS:
                    self._dump_maps()

    def _population(self) -> None:
        """"update" policy: population tracepoints on when a file enters an
        update, off POPULATION_LINGER s after the last one left it."""
        t = self.tracer
        if t is None or not t.population_on_demand or self.kexec_seen:
            return
        now = time.monotonic()
        with self.lock:
            busy = self.agg.in_update()
        if busy:
            self._busy_at = now
            try:
                if t.population_on():
                    self.progress("luotrace: a file entered an update: population tracepoints attached")
            except LuotraceError as e:
                self.progress(f"luotrace: {e}")
        elif t.population_live and now - self._busy_at >= POPULATION_LINGER:
            t.population_off()
            self.progress("luotrace: no file in an update: population tracepoints detached")

    def _end(self, progs: Dict[str, Dict[str, int]], stopped_by: str) -> dict:
        return {
            "stopped_by": stopped_by,
            "duration_ns": time.monotonic_ns() - self.agg.base,
            "bpf": {"run_time_ns": sum(p["run_time_ns"] for p in progs.values()),
                    "run_cnt": sum(p["run_cnt"] for p in progs.values()),
                    "missed": sum(p.get("recursion_misses", 0) for p in progs.values()),
                    "stats_enabled": bool(self.stats and self.stats.on), "programs": progs},
            "records": self.agg.received,
        }

    def snapshot(self, keep_finished: Optional[int] = None) -> dict:
        """The report as of now (maps read now); after stop, the final report.
        With KEEP_FINISHED (a long-running serve), finished files beyond that
        many are then folded into totals and deleted from the BPF maps."""
        with self.lock:
            if self.final is not None:
                return self.final
            maps = self.bpf.dump_maps()
            progs = self.bpf.prog_stats()
            self.agg.finish(maps)
            rows = file_rows(self.agg)
            rep = build(self.agg, self.header, self._end(progs, "running"), rows=rows)
            if keep_finished is not None:
                gone = retire(self.agg, keep_finished, rows)
                if gone:
                    # the recording keeps the rows the maps are about to lose
                    self._write(lambda w: w.write_maps(maps))
                    self.bpf.forget(gone)
            return rep

    def join(self, before: str) -> LiveJoin:
        """BEFORE (the old kernel's recording of the update that brought this
        boot up) joined with this run's, kept current from now on: fed every
        record so far on disk (the recording flushed), then each batch as the
        aggregator gets it, under the lock, so no batch falls between."""
        if not self.output:
            raise LuotraceError("a join needs this run's recording", "give -o")
        j = LiveJoin(before, self.header, self.output)
        with self.lock:
            self._write(lambda w: w.flush())
            j.catch_up()
            self.on_batch.append(j.feed)
        return j

    def joined(self, j: LiveJoin) -> dict:
        """J's report now (this run's maps and program stats read under the
        lock; the clock runs to now); once the run has stopped, its recording
        is whole: the two files joined, as `report BEFORE OUTPUT` joins them."""
        with self.lock:
            if self.final is None:
                return j.report(self.bpf.dump_maps(), self.bpf.prog_stats(), time.monotonic_ns())
        return join_report([j.before, j.output])

    def stop(self, stopped_by: str) -> dict:
        """Drain, read the maps, detach, close the recording; returns the final report."""
        tracer = self.bpf
        try:
            tracer.drain()
            self.pump()
            maps = tracer.dump_maps()
            progs = tracer.prog_stats()
        finally:
            tracer.close(self.progress)
            self._stats_off()
        end = self._end(progs, stopped_by)
        with self.lock:
            self._write(lambda w: w.close(maps, end))
            self.writer = None
            self.agg.finish(maps)
            self.final = build(self.agg, self.header, end)
        return self.final

    def _stats_off(self) -> None:
        if self.stats is not None:
            self.stats.close()

    def abort(self) -> None:
        """Error path: detach and keep what was recorded."""
        self.set_state("stopped")
        if self.tracer is not None:
            self.tracer.close()
        self._stats_off()
        self._write(lambda w: w.flush())


def uses_path(command: Optional[List[str]], path: str) -> Optional[str]:
    """The argument of COMMAND that names the file at PATH, if any: the
    recording must not be written over what the traced command runs or reads."""
    for arg in command or []:
        try:
            if os.path.exists(arg) and os.path.exists(path) and os.path.samefile(arg, path):
                return arg
        except OSError:
            continue
    return None


def run(opts: Options, output: Optional[str], command: Optional[List[str]] = None,
        duration: Optional[float] = None, labels: Optional[Dict[str, str]] = None,
        progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
        on_started: Optional[Callable[[LiveRun], None]] = None,
        linger: bool = False, force: bool = False,
        on_stopped: Optional[Callable[[RunResult], None]] = None, command_stdout=None) -> RunResult:
    """Trace until COMMAND exits, DURATION passes or SIGINT/SIGTERM/SIGHUP/
    SIGQUIT.  A signal before the probes are attached cancels the run before
    COMMAND starts.  With ``linger`` the run stays up after the command
    exits (serving its final state through ``on_started``'s hooks) until a
    signal.  COMMAND_STDOUT: where COMMAND's stdout goes (`record --json`
    sends it to stderr so that stdout is the JSON alone).  No failure of luotrace kills COMMAND: after one, the probes are
    detached and COMMAND runs on untraced to its end."""
    if output:
        if arg := uses_path(command, output):
            raise LuotraceError(f"the recording {output} is {arg}, which the traced command uses",
                                "write the recording somewhere else")
        check_output(output, force, "recording")
    child: Optional[subprocess.Popen] = None
    stopped_by = ""
    with StopSignals() as stop:
        live = LiveRun(opts, output, labels, force)
        live.progress = progress
        try:
            live.start(lambda: progress("luotrace: compiling and attaching the probes..."))
            if stop.reason:  # asked to stop while compiling and attaching: the command never starts
                command = None
                progress(f"luotrace: {stop.reason} before tracing started; the command was not run")
            else:
                progress(f"luotrace: tracing {live.attached()} probes in {opts.mode} mode"
                         f"{' on ' + opts.model if opts.model else ''}"
                         f"{' (programs kept loaded by the last start: no compile)' if live.bpf.reused else ''}"
                         "; Ctrl-C to stop")
                if live.bpf.backing.standin:
                    progress(f"luotrace: {live.bpf.backing.line()}")
                if live.bpf.cache_note:
                    progress(f"luotrace: {live.bpf.cache_note}")
            if on_started:
                on_started(live)
            if command:
                try:
                    # the traced command makes the guest_memfd files the trace watches
                    env = dict(os.environ, **{BACKING_ENV: live.bpf.backing.choice})
                    child = subprocess.Popen(command, stdout=command_stdout, env=env)
                except OSError as e:
                    raise LuotraceError(f"cannot run {command[0]}: {e.strerror}", "check the command after --")
            deadline = time.monotonic() + duration if duration else None
            last_note = time.monotonic()
            while True:
                live.poll(100)
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
                    progress(f"luotrace: {live.agg.received} events so far, "
                             f"{live.bpf.counters()['lost']} lost")
            live.set_state("detaching")
            stop.quiet()
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGINT if stopped_by == "SIGINT" else signal.SIGTERM)
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            n = live.attached()
            progress(f"luotrace: draining and detaching {n} probes...")
            t0 = time.monotonic()
            report = live.stop(stopped_by)
            live.set_state("stopped")
            progress(f"luotrace: {n} probes detached in {time.monotonic() - t0:.1f} s")
        except BaseException as e:
            live.abort()
            if child is not None and child.poll() is None:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                progress(f"luotrace: tracing failed ({why}); probes detached, the command runs on untraced")
                stop.quiet()
                child.wait()
            raise
        if live.recording_error:
            progress(f"luotrace: recording {output} is incomplete: {live.recording_error}")
        result = RunResult(report, output, child.returncode if child else None, stopped_by, live.recording_error)
        if on_stopped:
            on_stopped(result)
        if linger and not stop.reason:
            stop.arm()
            progress("luotrace: probes detached; serving the final state until Ctrl-C")
            while not stop.reason:
                time.sleep(0.2)
    return result


T = TypeVar("T")


def _in_thread(fn: Callable[[], T]) -> T:
    """FN's result, computed in another thread while this one waits in
    short sleeps: BCC's compile is one long C call, and signal handlers run
    only between the main thread's bytecodes, so a second Ctrl-C while it
    compiles would wait for the whole compile."""
    out: List = []

    def work() -> None:
        try:
            out.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out.append((False, e))
    t = threading.Thread(target=work, name="luotrace-load", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.05)
    ok, value = out[0]
    if not ok:
        raise value
    return value
