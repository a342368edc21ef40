"""`luotrace top`: the update, live, on this host.

Where the numbers come from, in this order: a recording played back
(--replay); the running service (`luotrace serve`'s /report.json: no second
set of probes); else probes of its own, attached for as long as top runs
(or the command after --).  Views are built by tracer/analysis/progress.py
and drawn by exporters/top_text.py; this module is the terminal and the loop.

The full screen is the standard library's curses: a root tool run over SSH
on a host being updated should need nothing more than Python, and curses
restores the terminal on every way out (q, Ctrl-C, SIGTERM, an exception).
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from exporters import top_text as tt
from tracer.analysis import progress as pg
from tracer.analysis.gate import failures
from tracer.analysis.join import LiveJoin, join_report
from tracer.base.errors import LuotraceError

DEFAULT_FROM = "http://127.0.0.1:9477"
Frame = Tuple[dict, int, bool]  # (report, now in ns since its base, last)


@dataclass
class TopOptions:
    interval: float = 1.0
    count: Optional[int] = None
    mode: str = "screen"  # screen | plain | json | once
    no_clear: bool = False
    maxrows: Optional[int] = None
    sort: str = "session"
    stall_s: float = 30.0
    fail_on_stall: bool = False
    fail_on: List[str] = field(default_factory=list)
    before: Optional[dict] = None  # the old kernel's report of this update
    before_path: Optional[str] = None  # ... and its recording (a live run in the new kernel joins with it)
    history: pg.History = field(default_factory=pg.History)


# ---- where the reports come from ----

def serve_report(url: str, timeout: float = 1.0, what: str = "report") -> Optional[dict]:
    """The running service's live report (WHAT "report"), or the update that
    brought this boot up (WHAT "update"); None when nothing answers at URL."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + f"/{what}.json", timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def from_serve(url: str, interval: float, note: Callable[[str], None],
               on_update: Callable[[dict], None] = lambda rep: None) -> Iterator[Frame]:
    """One request per frame; a service that stops answering (the kexec, a
    restart) leaves the last frame up, said in the note line.  In a boot a
    live update brought up, the service's /update.json (that update whole:
    the old kernel's recording joined with this boot's) is the frame, so each
    retrieve shows against what was preserved (ON_UPDATE hears it)."""
    last: Optional[dict] = None
    joined = serve_report(url, max(1.0, interval), "update") is not None
    if joined:
        note(f"luotrace: {url}: this boot came up by a live update; showing it whole (both kernels)")
    while True:
        rep = serve_report(url, max(1.0, interval), "update" if joined else "report")
        if rep is None:
            if last is None:
                raise LuotraceError(f"luotrace serve does not answer at {url}", "start it, or drop --from")
            note(f"luotrace: {url} does not answer; showing the last frame")
        else:
            last = rep
            if joined:
                on_update(rep)
        yield last, int(last.get("duration_ns") or 0), False
        time.sleep(interval)


def from_replay(paths: List[str], interval: float, speed: float) -> Iterator[Frame]:
    """A recording played back; two: both sides of an update, joined (the
    new kernel's retrieves on the files the old one preserved)."""
    from tracer.analysis.player import play, play_update
    step = int(interval * (speed or 1.0) * 1e9)
    frames = play(paths[0], step) if len(paths) == 1 else play_update(paths[0], paths[1], step)
    for rep, now, last in frames:
        yield rep, now, last
        if speed and not last:
            time.sleep(interval)


class LiveFrames:
    """Frames of a live run of our own: the run (its signals, its command)
    keeps the main thread; the view takes the frames from a queue.  With
    BEFORE (the old kernel's recording of this update, in the new kernel),
    each frame is that recording joined with the one this run is writing
    (OUTPUT), as `report BEFORE OUTPUT` would join them: each retrieve lands
    on the file the old kernel preserved.  The join is kept current
    (analysis.join.LiveJoin: the old recording fed once, this run's records
    as they come); the last frame is joined from the two files, as `report`
    joins them."""

    def __init__(self, interval: float, before: Optional[str] = None, output: Optional[str] = None):
        self.interval = interval
        self.before, self.output = before, output
        self.q: "queue.Queue[Frame]" = queue.Queue(maxsize=2)
        self.live = None
        self.join: Optional[LiveJoin] = None
        self.done = threading.Event()

    def started(self, live) -> None:
        self.live = live
        self.join = None
        if self.before and self.output:
            try:
                self.join = live.join(self.before)
            except LuotraceError as e:  # this run's own view instead
                print(f"luotrace: top cannot join {self.before}: {e}", file=sys.stderr)
        # the jump: a frame at once, with the state at the kexec (the CPUs may stop before the next one)
        live.on_kexec.append(lambda run: self._put((run.snapshot(), int(time.monotonic_ns() - run.agg.base), False)))
        threading.Thread(target=self._pump, name="luotrace-top", daemon=True).start()

    def _report(self) -> dict:
        if self.join is not None:
            return self.live.joined(self.join)  # type: ignore[attr-defined]
        return self.live.snapshot()  # type: ignore[attr-defined]

    def _pump(self) -> None:
        while not self.done.is_set():
            rep = self._report()
            self._put((rep, int(rep.get("duration_ns") or 0), False))
            self.done.wait(self.interval)

    def _put(self, frame: Frame) -> None:
        try:
            self.q.put_nowait(frame)
        except queue.Full:  # the view is slower than the run: drop the older frame
            try:
                self.q.get_nowait()
            except queue.Empty:
                pass
            self.q.put_nowait(frame)

    def ended(self, result) -> None:
        self.done.set()
        rep = result.report
        if self.before and self.output and not result.recording_error:
            rep = join_report([self.before, self.output])
        self._put((rep, int(rep.get("duration_ns") or 0), True))

    def frames(self) -> Iterator[Frame]:
        while True:
            frame = self.q.get()
            yield frame
            if frame[2]:
                return


# ---- the views ----

@dataclass
class Outcome:
    last: Optional[pg.View] = None
    report: Optional[dict] = None
    stalled: Dict[str, str] = field(default_factory=dict)  # file key -> the rule that first flagged it


def _views(frames: Iterator[Frame], o: TopOptions, out: Outcome) -> Iterator[pg.View]:
    n = 0
    for rep, now, last in frames:
        v = pg.view(rep, now, o.history, out.last, o.stall_s, o.before, finished=last)
        for r in v.rows:
            if r.stall:
                out.stalled.setdefault(r.key, r.stall)
        out.last, out.report = v, rep
        yield v
        n += 1
        if last or (o.count is not None and n >= o.count):
            return


def run_lines(frames: Iterator[Frame], o: TopOptions, write: Callable[[str], None] = print) -> Outcome:
    """--plain, --json and --once: lines on stdout, flushed per interval."""
    out = Outcome()
    prev: Optional[pg.View] = None
    for v in _views(frames, o, out):
        if o.mode == "json":
            write(json.dumps(v.to_json()))
        elif o.mode == "plain":
            for line in tt.plain(prev, v):
                write(line)
        prev = v
        sys.stdout.flush()
        if o.mode == "frames":
            import shutil
            size = shutil.get_terminal_size()
            frame = tt.screen(v, tt.Screen(sort=o.sort, selected=-1, maxrows=o.maxrows), width=size.columns,
                              height=size.lines)
            for line in frame[:-2]:
                write(line)
            write("")
    if o.mode == "once" and out.last is not None:
        lines = tt.screen(out.last, tt.Screen(sort=o.sort, selected=-1, maxrows=o.maxrows), width=200, height=10_000)
        for line in lines[:-2] if lines else []:
            if line.strip():
                write(line)
    return out


def run_screen(frames: Iterator[Frame], o: TopOptions, quit_run: Optional[Callable[[], None]],
               notes: "queue.Queue[str]", leave: Optional[threading.Event] = None) -> Outcome:
    """The full-screen view: frames as they come, keys between them.
    QUIT_RUN: how q stops a run of our own (which then hands over its final
    frame); None when there is none to stop (the service, a recording)."""
    import curses
    out = Outcome()
    state = tt.Screen(sort=o.sort, delay_s=o.interval, maxrows=o.maxrows)
    views = _views(frames, o, out)
    current: List[Optional[pg.View]] = [None]
    frame_q: "queue.Queue[Optional[pg.View]]" = queue.Queue()

    def feed() -> None:
        try:
            for v in views:
                frame_q.put(v)
        except BaseException as e:  # noqa: BLE001 - shown, then raised in the view's thread
            frame_q.put(None)
            out.report = {"_error": e}
            return
        frame_q.put(None)

    threading.Thread(target=feed, name="luotrace-top-frames", daemon=True).start()

    def draw(scr) -> None:
        h, w = scr.getmaxyx()
        if current[0] is None:
            lines = ["luotrace top: waiting for the first frame...", state.note]
        else:
            lines = tt.screen(current[0], state, width=w - 1, height=h)
        scr.erase()
        for y, line in enumerate(lines[:h]):
            try:
                attr = curses.A_REVERSE if line.startswith(">") else (curses.A_BOLD if line.startswith("STALL") else 0)
                scr.addstr(y, 0, line[: w - 1], attr)
            except curses.error:
                pass
        scr.refresh()

    def loop(scr) -> None:
        curses.curs_set(0)
        scr.timeout(100)
        ended = False
        filtering: Optional[str] = None
        while True:
            try:
                while True:
                    state.note = notes.get_nowait()
            except queue.Empty:
                pass
            try:
                while True:
                    v = frame_q.get_nowait()
                    if v is None:
                        ended = True
                        state.note = state.note if "_error" in (out.report or {}) else \
                            "the run has ended: q to quit (the last frame stays on the terminal)"
                        break
                    if not state.paused:
                        current[0] = v
            except queue.Empty:
                pass
            if "_error" in (out.report or {}):
                raise out.report["_error"]  # type: ignore[index,misc]
            draw(scr)
            if ended and leave is not None and leave.is_set():
                return
            k = scr.getch()
            if k == -1:
                continue
            if filtering is not None:
                if k in (10, 13, curses.KEY_ENTER):
                    state.filter, filtering = filtering, None
                elif k in (27,):
                    filtering = None
                elif k in (curses.KEY_BACKSPACE, 127, 8):
                    filtering = filtering[:-1]
                elif 32 <= k < 127:
                    filtering += chr(k)
                state.note = f"filter: {filtering}_" if filtering is not None else ""
                continue
            ch = chr(k) if 0 <= k < 256 else ""
            if ch in ("q", "Q"):
                if not ended and quit_run is not None:
                    quit_run()
                    # the run stops, detaches and hands the final frame over
                    state.note = "luotrace: stopping..."
                    deadline = time.monotonic() + 30
                    while not ended and time.monotonic() < deadline:
                        v = frame_q.get()
                        if v is None:
                            break
                        current[0] = v
                        draw(scr)
                return
            if ch in ("h", "?"):
                state.help = not state.help
            elif ch == "s":
                state.sort = tt.SORTS[(tt.SORTS.index(state.sort) + 1) % len(tt.SORTS)]
            elif ch == "f":
                filtering = ""
                state.note = "filter: _"
            elif ch == "p":
                state.paused = not state.paused
            elif ch == "+":
                state.delay_s = min(60.0, state.delay_s * 2)
            elif ch == "-":
                state.delay_s = max(0.1, state.delay_s / 2)
            elif k in (curses.KEY_DOWN, ord("j")):
                state.selected += 1
            elif k in (curses.KEY_UP, ord("k")):
                state.selected = max(0, state.selected - 1)
            elif ch == "v":
                state.sessions, state.session, state.drilled, state.selected = not state.sessions, None, False, 0
            elif k in (10, 13, curses.KEY_ENTER, curses.KEY_RIGHT):
                table = tt.session_table(current[0]) if state.sessions and current[0] is not None else []
                if state.sessions and table:  # a session's files
                    state.session = table[min(state.selected, len(table) - 1)]["id"]
                    state.sessions, state.selected = False, 0
                elif not state.sessions:
                    state.drilled = True
            elif k in (27, curses.KEY_LEFT):
                if state.help or state.drilled:
                    state.drilled = state.help = False
                elif state.session is not None:  # back to the sessions list, on the session left
                    table = tt.session_table(current[0]) if current[0] is not None else []
                    ids = [x["id"] for x in table]
                    state.selected = ids.index(state.session) if state.session in ids else 0
                    state.sessions, state.session = True, None
            if current[0] is not None:
                state.selected = min(state.selected, max(0, tt.selectable(current[0], state) - 1))

    curses.wrapper(loop)
    if out.last is not None:  # the last frame stays on the terminal (scrollback, logs)
        for line in tt.screen(out.last, tt.Screen(sort=state.sort, selected=-1), width=200, height=10_000)[:-2]:
            if line.strip():
                print(line)
    return out


def exit_code(out: Outcome, o: TopOptions) -> Tuple[int, List[str]]:
    """What a script learns: FAIL_EXIT for a stall (--fail-on-stall) or what --fail-on names."""
    why = []
    if o.fail_on_stall and out.stalled:
        why += [f"{key} stalled ({rule})" for key, rule in out.stalled.items()]
    if o.fail_on and out.report is not None:
        why += failures(out.report, o.fail_on)
    return (3 if why else 0), why


def sigterm_exits() -> None:
    """SIGTERM leaves as Ctrl-C does: through curses' restore of the terminal."""
    def handler(signum, frame):
        raise SystemExit(143)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


_QUITTING = threading.Event()


def quit_own_run() -> None:
    """q in the view: the run (main thread) stops as for Ctrl-C, detaching
    its probes; once (a second SIGINT would make it quit without detaching)."""
    if not _QUITTING.is_set():
        _QUITTING.set()
        os.kill(os.getpid(), signal.SIGINT)


def history_and_before(state_dir: Optional[str], histories: List[str], before: Optional[str],
                       replays: Tuple[str, ...] | List[str]) -> Tuple[pg.History, Optional[dict], Optional[str]]:
    """This host's earlier updates (the state directory's recordings of other
    boots, and --history), and the old kernel's recording of the update now
    in its new kernel, with its report (--before; else the previous boot's
    in the state directory; for two recordings played back, the first)."""
    from tracer.analysis.replay import replay
    from tracer.kernel import clock
    from tracer.live.state import StateDir
    paths = list(histories)
    sd = StateDir(state_dir, progress=lambda m: None) if state_dir and os.path.isdir(state_dir) else None
    if sd is not None and not replays:
        me = clock.boot_id()
        paths += [p for p in sd.recordings()[-8:] if me not in os.path.basename(p)]
    reports = []
    for p in paths:
        try:
            reports.append(replay(p))
        except LuotraceError as e:
            if p in histories:
                raise
            print(f"luotrace: {p} left out of the estimates: {e.args[0] if e.args else e}", file=sys.stderr)
    old_path = replays[0] if len(replays) == 2 else before
    if old_path is None and sd is not None and not replays:
        prev = sd.previous_boot()
        old_path = prev.path if prev else None
    return pg.History.of(reports), (replay(old_path) if old_path else None), old_path


def show(frames: Iterator[Frame], o: TopOptions, quit_run: Optional[Callable[[], None]],
         notes: "queue.Queue[str]", leave: Optional[threading.Event] = None) -> Outcome:
    """The view the options ask for, on FRAMES, in this thread."""
    if o.mode == "screen":
        sigterm_exits()
        return run_screen(frames, o, quit_run, notes, leave)
    return run_lines(frames, o)


def show_own(opts, command: Optional[List[str]], o: TopOptions, notes: "queue.Queue[str]",
             say: Callable[[str], None], output: Optional[str] = None, force: bool = False) -> Outcome:
    """Probes of our own: the run keeps the main thread (its signals, its
    command); the view runs beside it and stops it when it is done (q, COUNT)."""
    from tracer.live.runner import run
    scratch = None
    if o.before_path and not output:  # the join needs this run's recording: a private one, removed after
        from tracer.base.private import RUN_DIR, private_dir
        import tempfile
        fd, scratch = tempfile.mkstemp(prefix="top-", suffix=".luo", dir=private_dir(RUN_DIR))
        os.close(fd)
        output, force = scratch, True
    frames = LiveFrames(o.interval, o.before_path, output)
    box: dict = {}
    leave = threading.Event()

    def view() -> None:
        try:
            box["out"] = show(frames.frames(), o, quit_own_run, notes, leave)
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread
            box["error"] = e
        if not frames.done.is_set():
            quit_own_run()  # the view is done before the run: stop it (it detaches, then returns)

    t = threading.Thread(target=view, name="luotrace-top-view", daemon=True)
    t.start()
    try:
        res = run(opts, output, command=command, progress=say, on_started=frames.started, on_stopped=frames.ended,
                  force=force, command_stdout=sys.stderr if o.mode in ("json", "plain", "once") else subprocess.DEVNULL)
        if res.stopped_by != "command exited":
            leave.set()  # a signal (Ctrl-C, SIGTERM) or q: the view goes too
    finally:
        frames.done.set()
        t.join(30)
        if scratch:
            os.unlink(scratch)
    if "error" in box:
        raise box["error"]
    return box.get("out") or Outcome()
