"""`luotrace serve`: trace live and export at scrape time, keeping the update
the service saw and the earlier boots' in its state directory; or serve the
final state of a recording.  The HTTP side is tracer.service.http."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from exporters.prometheus import earlier_boot_families
from tracer.analysis.join import LiveJoin, join_report
from tracer.analysis.replay import replay
from tracer.base.errors import LuotraceError
from tracer.live.runner import LiveRun, RunResult, run
from tracer.live.state import StateDir
from tracer.live.stop import StopSignals
from tracer.probes.plan import Options
from tracer.service import sdnotify
from tracer.service.http import STATE_WHY, MetricsServer
from tracer.service.update_export import UpdateExport

KEEP_FILES = 64  # finished files a live serve keeps in detail; older ones live on in the counters


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
    previous: List[str] = []  # the recording of the update that brought this boot up, once read

    joins: List[LiveJoin] = []
    join_lock = threading.Lock()

    def update() -> Optional[dict]:
        """That update whole: its old kernel's recording joined with this
        boot's, kept current while tracing (LiveJoin: the old one read once),
        joined from the files once the run has stopped."""
        if not previous or not output or not os.path.exists(output):
            return None
        tracing = live.get("tracing")
        try:
            if tracing is None:
                return join_report([previous[0], output])
            with join_lock:
                if not joins:
                    joins.append(tracing.join(previous[0]))
            return tracing.joined(joins[0])
        except LuotraceError:
            return None  # this boot's recording holds no sound record yet

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
                        tracing=lambda: ready()[0], update=update)
    if state is not None:
        # Read in the background: retrieve runs right after a boot, and the
        # probes must be attached by then, not after a replay.
        threading.Thread(target=_load_earlier, args=(state, output, earlier, progress, previous),
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


def _load_earlier(state: StateDir, current: str, into: List, progress: Callable[[str], None],
                  previous: List[str]) -> None:
    try:
        b = state.previous_boot()
        if b is not None:
            into.extend(earlier_boot_families(b.report))
            previous.append(b.path)
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


