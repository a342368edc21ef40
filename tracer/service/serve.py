"""Serving metrics: live (attach, trace, export at scrape time) or the final
state of a recording.  Localhost by default; listening beyond it is an
explicit choice (``--listen 0.0.0.0:9477``)."""
from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.exposition import ThreadingWSGIServer

from exporters.prometheus import LuotraceCollector, earlier_boot_families, push, write_textfile, write_textfile_at

from tracer.service import sdnotify
from tracer.base.errors import LuotraceError
from tracer.probes.plan import Options
from tracer.recording.format import check_output
from tracer.analysis.replay import replay
from tracer.live.runner import LiveRun, RunResult, run
from tracer.live.stop import StopSignals
from tracer.live.state import StateDir

KEEP_FILES = 64  # finished files a live serve keeps in detail; older ones live on in the counters
SNAPSHOT_TTL_S = 0.5  # scrapes within this share one exposition: concurrent scrapers cost one


def parse_listen(listen: str) -> Tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LuotraceError(f"bad --listen '{listen}'", "use HOST:PORT, e.g. 127.0.0.1:9477")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class _Server(ThreadingWSGIServer):
    """One thread per connection (daemon), and an accept backlog that queues a
    burst of scrapers instead of refusing them (socketserver's default is 5)."""
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:
        """A client that timed out or went away is routine; anything else is
        one line on stderr, never a traceback per request."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return
        print(f"luotrace: serving {client_address[0]} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


class _Handler(WSGIRequestHandler):
    timeout = 10  # seconds: a client that opens a connection and sends nothing is dropped

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        pass


Readiness = Callable[[], Tuple[bool, str]]  # (watching, what it is doing)

# what /-/ready says in each state of a live run (LiveRun.state)
STATE_WHY = {"starting": "starting: compiling and attaching the probes",
             "tracing": "tracing: every selected probe attached",
             "detaching": "detaching the probes",
             "stopped": "probes detached: serving the final state, nothing is traced"}


def metrics_app(registry: CollectorRegistry, ttl: float = SNAPSHOT_TTL_S,
                ready: Readiness = lambda: (True, "serving")) -> Callable:
    """A WSGI app for /metrics, /-/ready and /-/healthy (as Prometheus's own
    server has them).  /-/ready answers 200 only while READY says luotrace
    is watching, else 503 with why: a script, systemd or Kubernetes waits on
    it before starting an update.  The exposition is built at most once per TTL.
    When it is stale, one scraper rebuilds it while the others are answered
    at once with the previous one (at most 2 x TTL old): twenty concurrent
    scrapers cost one build, and only one of them waits for it."""
    cond = threading.Condition()
    cache: Dict[str, object] = {"at": -1e9, "body": None, "building": False, "ready": None}

    def body() -> bytes:
        with cond:
            # a change of readiness is news at once (luotrace_tracing agrees with /-/ready)
            if cache["ready"] != ready()[0]:
                cache["at"], cache["ready"] = -1e9, ready()[0]
            fresh = time.monotonic() - cache["at"] < ttl  # type: ignore[operator]
            if fresh or (cache["building"] and cache["body"] is not None):
                return cache["body"]  # type: ignore[return-value]
            while cache["building"]:  # the very first build: wait for it
                cond.wait()
            if cache["body"] is not None and time.monotonic() - cache["at"] < ttl:  # type: ignore[operator]
                return cache["body"]  # type: ignore[return-value]
            cache["building"] = True
        new = None
        try:
            new = generate_latest(registry)
        finally:
            with cond:
                if new is not None:
                    cache["body"], cache["at"] = new, time.monotonic()
                cache["building"] = False
                cond.notify_all()
        return new

    def text(start_response: Callable, status: str, msg: str) -> List[bytes]:
        data = (msg + "\n").encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
        return [data]

    def app(environ: dict, start_response: Callable) -> List[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            data = b"luotrace: only GET and HEAD\n"
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", str(len(data))),
                                                      ("Content-Type", "text/plain; charset=utf-8")])
            return [data]
        out = route(environ, start_response)
        return [] if method == "HEAD" else out  # HEAD: the headers GET would give, no body

    def route(environ: dict, start_response: Callable) -> List[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/-/healthy":
            return text(start_response, "200 OK", "luotrace is healthy")
        if path == "/-/ready":
            ok, why = ready()
            return text(start_response, "200 OK" if ok else "503 Service Unavailable", f"luotrace: {why}")
        if path not in ("/", "/metrics"):
            return text(start_response, "404 Not Found", "luotrace serves /metrics, /-/ready and /-/healthy")
        data = body()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(data)))])
        return [data]
    return app


class MetricsServer:
    """An HTTP server for /metrics around a LuotraceCollector."""

    def __init__(self, listen: str, snapshot: Callable[[], dict], per_program: bool = False,
                 earlier: Callable[[], list] = lambda: [],
                 ready: Readiness = lambda: (True, "serving"), tracing: Callable[[], bool] = lambda: False):
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        LuotraceCollector(snapshot, registry=self.registry, per_program=per_program, earlier=earlier,
                          tracing=tracing)
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = type("_Server", (_Server,), {"address_family": family})
            self.server: Any = make_server(self.host, self.port, metrics_app(self.registry, ready=ready),
                                           server_class, handler_class=_Handler)
        except socket.gaierror as e:
            raise LuotraceError(f"cannot listen on {self.host}:{self.port}: {e.strerror}", "check --listen") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LuotraceError(f"port {self.port} on {self.host} is already in use",
                                    "stop the other exporter or choose another port with --listen") from None
            raise LuotraceError(f"cannot listen on {self.host}:{self.port}: {e.strerror}",
                                "check --listen") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="luotrace-metrics", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """Where to scrape, as a URL a browser or curl takes (an IPv6 host in
        brackets; the port the socket really has, should 0 have been asked)."""
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.server.server_address[1]}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class UpdateExport:
    """Where the old kernel's final numbers go when kernel_kexec() is seen
    (and at the end of a run): a textfile for node_exporter, a Pushgateway.
    The scrape interval is no longer a race against the kexec."""

    def __init__(self, textfile_dir: Optional[str] = None, pushgateway: Optional[str] = None,
                 per_program: bool = False, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        if textfile_dir is not None and not os.path.isdir(textfile_dir):
            raise LuotraceError(f"--textfile-dir {textfile_dir} is not a directory",
                                "create it, or point it at node_exporter's --collector.textfile.directory")
        if pushgateway is not None and not pushgateway.startswith(("http://", "https://")):
            raise LuotraceError(f"bad --pushgateway '{pushgateway}'", "give its URL, e.g. http://127.0.0.1:9091")
        self.textfile_dir, self.pushgateway, self.per_program = textfile_dir, pushgateway, per_program
        self.progress = progress

    def __bool__(self) -> bool:
        return bool(self.textfile_dir or self.pushgateway)

    def write(self, rep: dict, when: str) -> None:
        """Textfile first (a local fsync), then the network: each failure is one line, never the run's end."""
        if self.textfile_dir:
            try:
                path = write_textfile(self.textfile_dir, rep, self.per_program)
                self.progress(f"luotrace: metrics {when} written to {path}")
            except OSError as e:
                self.progress(f"luotrace: cannot write metrics to {self.textfile_dir}: {e.strerror}")
        if self.pushgateway:
            try:
                push(self.pushgateway, rep, self.per_program)
                self.progress(f"luotrace: metrics {when} pushed to {self.pushgateway}")
            except OSError as e:
                self.progress(f"luotrace: cannot push metrics to {self.pushgateway}: {e}")

    def attach(self, tracing: LiveRun) -> None:
        tracing.on_kexec.append(lambda s: self.write(s.snapshot(), "at the kexec"))


def serve_live(opts: Options, listen: str, output: Optional[str], command: Optional[List[str]],
               duration: Optional[float], labels: Dict[str, str],
               progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
               keep_files: int = KEEP_FILES, per_program: bool = False,
               update_export: Optional[UpdateExport] = None, state: Optional[StateDir] = None) -> RunResult:
    """Trace and export; after COMMAND (or --duration) ends, keep serving the
    final state until SIGINT/SIGTERM.  Finished files beyond KEEP_FILES are
    folded into the counters at each scrape, so that a service running for
    months holds and scrapes the files of the moment, not all of history.
    With STATE, this boot is recorded there, and the previous boot's
    recording, if it ended at a kexec, is exported beside the live numbers."""
    live: Dict[str, LiveRun] = {}
    earlier: List = []

    def snapshot() -> dict:
        tracing = live.get("tracing")
        return tracing.snapshot(keep_files) if tracing else {"recording": {"mode": opts.mode}, "files": []}

    def ready() -> Tuple[bool, str]:
        tracing = live.get("tracing")
        state = tracing.state if tracing else "starting"
        return state == "tracing", STATE_WHY[state]

    def notify(state: str) -> None:
        """systemd: READY=1 once watching, STOPPING=1 when the detach begins."""
        tracing = live["tracing"]
        if state == "tracing":
            sdnotify.notify("READY=1", f"STATUS=tracing {tracing.attached()} probes in {opts.mode} mode")
        elif state == "detaching":
            sdnotify.notify("STOPPING=1", "STATUS=detaching the probes")
        elif state == "stopped":
            sdnotify.notify("STATUS=probes detached: serving the final state")

    if state is not None:
        if output:
            raise LuotraceError("-o and --state-dir both say where the recording goes",
                                "give one: with --state-dir, serve records into that directory")
        output = state.new_recording()
    # bind first: a taken port fails before anything is attached
    srv = MetricsServer(listen, snapshot, per_program, earlier=lambda: earlier, ready=ready,
                        tracing=lambda: ready()[0])
    if state is not None:
        # Read in the background: retrieve runs right after a boot, and the
        # probes must be attached by then, not after a replay.
        threading.Thread(target=_load_earlier, args=(state, output, earlier, progress),
                         name="luotrace-state", daemon=True).start()

    def started(tracing: LiveRun) -> None:
        live["tracing"] = tracing
        tracing.on_state.append(notify)
        if update_export:
            update_export.attach(tracing)
        progress(f"luotrace: metrics on {srv.url}")

    def ended(res: RunResult) -> None:
        if update_export:
            update_export.write(res.report, "at the end")

    try:
        return run(opts, output, command=command, duration=duration, labels=labels, progress=progress,
                   on_started=started, linger=bool(command or duration), on_stopped=ended)
    finally:
        srv.close()


def _load_earlier(state: StateDir, current: str, into: List, progress: Callable[[str], None]) -> None:
    try:
        b = state.previous_boot()
        if b is not None:
            into.extend(earlier_boot_families(b.report))
            n = sum(f["folios_preserved"] or 0 for f in b.report.get("files", []))
            progress(f"luotrace: exporting the update that ended boot {b.boot_id} ({b.kernel}): "
                     f"{len(b.report.get('files', []))} files, {n} folios preserved, from {b.path}")
        state.prune(current)
    except Exception as e:  # the live export goes on whatever an old file holds
        progress(f"luotrace: reading {state.path} failed: {type(e).__name__}: {e}")


def serve_replay(path: str, listen: str, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                 per_program: bool = False,
                 until: Optional[Callable[[], bool]] = None) -> None:
    """Serve the metrics a recording would have produced, until SIGINT/SIGTERM."""
    report = replay(path)
    srv = MetricsServer(listen, lambda: report, per_program, ready=lambda: (True, f"serving the recording {path}"))
    progress(f"luotrace: serving {path} on {srv.url}; Ctrl-C to stop")
    try:
        with StopSignals() as stop:
            while not stop.reason and not (until and until()):
                time.sleep(0.2)
    finally:
        srv.close()


def export_textfile(path: str, out: str, per_program: bool = False) -> None:
    """node_exporter textfile-collector format, written atomically (a
    temporary file renamed over OUT): so OUT must be a regular file or none,
    never a device or FIFO a rename would replace."""
    check_output(out, force=True, what="textfile")
    report = replay(path)
    try:
        write_textfile_at(out, report, per_program)
    except OSError as e:
        raise LuotraceError(f"cannot write {out}: {e.strerror}", "choose a writable path") from None
