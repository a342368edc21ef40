"""The service's HTTP side: /metrics (one exposition shared by scrapes that
come together), /-/ready and /-/healthy, GET and HEAD only.  Localhost by
default; listening beyond it is an explicit choice (``--listen 0.0.0.0:9477``)."""
from __future__ import annotations

import errno
import json
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.exposition import ThreadingWSGIServer

from exporters.prometheus import LuotraceCollector
from tracer.base.errors import LuotraceError


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


# what /-/ready says in each state of a live run (LiveRun.state)
STATE_WHY = {"starting": "starting: compiling and attaching the probes",
             "tracing": "tracing: every selected probe attached",
             "detaching": "detaching the probes",
             "stopped": "probes detached: serving the final state, nothing is traced"}


def metrics_app(registry: CollectorRegistry, ttl: float = SNAPSHOT_TTL_S,
                ready: Readiness = lambda: (True, "serving"),
                report: Optional[Callable[[], dict]] = None,
                update: Optional[Callable[[], Optional[dict]]] = None) -> Callable:
    """A WSGI app for /metrics, /-/ready and /-/healthy (as Prometheus's own
    server has them), and /report.json: the live report (schema
    luotrace.report/1, as `report --json` prints it), what `luotrace top`
    reads instead of attaching a second set of probes; /update.json: in the
    boot a live update brought up, that update whole (the previous boot's
    recording joined with this one's, as `report BEFORE AFTER` joins them),
    404 where there is none.  /-/ready answers 200 only while READY says luotrace
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
        if path == "/report.json" and report is not None:
            data = json.dumps(report()).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        if path == "/update.json":
            joined = update() if update is not None else None
            if joined is None:
                return text(start_response, "404 Not Found", "luotrace: no live update brought this boot up "
                                                             "(or serve runs without --state-dir)")
            data = json.dumps(joined).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        if path not in ("/", "/metrics"):
            return text(start_response, "404 Not Found",
                        "luotrace serves /metrics, /report.json, /-/ready and /-/healthy")
        data = body()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(data)))])
        return [data]
    return app


class MetricsServer:
    """An HTTP server for /metrics around a LuotraceCollector."""

    def __init__(self, listen: str, snapshot: Callable[[], dict], per_program: bool = False,
                 earlier: Callable[[], list] = lambda: [],
                 ready: Readiness = lambda: (True, "serving"), tracing: Callable[[], bool] = lambda: False,
                 update: Optional[Callable[[], Optional[dict]]] = None):
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        LuotraceCollector(snapshot, registry=self.registry, per_program=per_program, earlier=earlier,
                          tracing=tracing)
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = type("_Server", (_Server,), {"address_family": family})
            self.server: Any = make_server(self.host, self.port, metrics_app(self.registry, ready=ready, report=snapshot,
                                                                          update=update),
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


Readiness = Callable[[], Tuple[bool, str]]  # (watching, what it is doing)
