"""Serving metrics: live (attach, trace, export at scrape time) or the final
state of a recording.  Localhost by default; listening beyond it is an
explicit choice (``--listen 0.0.0.0:9477``)."""
from __future__ import annotations

import errno
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile

from exporters.prometheus import LuotraceCollector

from .errors import LuotraceError
from .loader import Options
from .recording import check_output
from .session import LiveSession, RunResult, _Stop, replay, run

DEFAULT_LISTEN = "127.0.0.1:9477"


def parse_listen(listen: str) -> Tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LuotraceError(f"bad --listen '{listen}'", "use HOST:PORT, e.g. 127.0.0.1:9477")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class MetricsServer:
    """prometheus_client's HTTP server around a LuotraceCollector."""

    def __init__(self, listen: str, snapshot: Callable[[], dict]):
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        LuotraceCollector(snapshot, registry=self.registry)
        try:
            self.server, self.thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LuotraceError(f"port {self.port} on {self.host} is already in use",
                                    "stop the other exporter or choose another port with --listen") from None
            raise LuotraceError(f"cannot listen on {self.host}:{self.port}: {e.strerror}",
                                "check --listen") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_live(opts: Options, listen: str, output: Optional[str], command: Optional[List[str]],
               duration: Optional[float], labels: Dict[str, str],
               progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> RunResult:
    """Trace and export; after COMMAND (or --duration) ends, keep serving the
    final state until SIGINT/SIGTERM."""
    live: Dict[str, LiveSession] = {}

    def snapshot() -> dict:
        sess = live.get("sess")
        return sess.snapshot() if sess else {"recording": {"mode": opts.mode}, "files": []}

    srv = MetricsServer(listen, snapshot)  # bind first: a taken port fails before anything is attached

    def started(sess: LiveSession) -> None:
        live["sess"] = sess
        progress(f"luotrace: metrics on http://{listen}/metrics")

    try:
        return run(opts, output, command=command, duration=duration, labels=labels, progress=progress,
                   on_started=started, linger=bool(command or duration))
    finally:
        srv.close()


def serve_replay(path: str, listen: str, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                 until: Optional[Callable[[], bool]] = None) -> None:
    """Serve the metrics a recording would have produced, until SIGINT/SIGTERM."""
    report = replay(path)
    srv = MetricsServer(listen, lambda: report)
    progress(f"luotrace: serving {path} on http://{listen}/metrics; Ctrl-C to stop")
    try:
        with _Stop() as stop:
            while not stop.reason and not (until and until()):
                time.sleep(0.2)
    finally:
        srv.close()


def export_textfile(path: str, out: str) -> None:
    """node_exporter textfile-collector format, written atomically (a
    temporary file renamed over OUT): so OUT must be a regular file or none,
    never a device or FIFO a rename would replace."""
    check_output(out, force=True, what="textfile")
    report = replay(path)
    registry = CollectorRegistry(auto_describe=False)
    LuotraceCollector(lambda: report, registry=registry)
    try:
        write_to_textfile(out, registry)
    except OSError as e:
        raise LuotraceError(f"cannot write {out}: {e.strerror}", "choose a writable path") from None
