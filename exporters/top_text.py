"""`luotrace top`'s renderings of a View (tracer/analysis/progress.py): the
full screen's lines (fits 80x24, grows with the terminal), --plain's
timestamped lines, --json's objects.  Text only: the terminal is the CLI's."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

from exporters.text import fmt_bytes, fmt_ns
from tracer.analysis.progress import Row, View, changes, done
from tracer.base.printable import printable

SORTS = ("session", "time", "size", "state")
SHORT = {"guest_memfd": "gmem"}
COLUMNS = (("FILE", 9), ("HDL", 5), ("SIZE", 6), ("STATE", 9), ("PHASE", 11), ("TIME", 6), ("FOLIOS", 12),
           ("RATE", 6), ("ETA", 6))


@dataclass
class Screen:
    """What the viewer chose: sort key, filter, the selected file and whether it is drilled into."""
    sort: str = "session"
    filter: str = ""
    selected: int = 0
    drilled: bool = False
    paused: bool = False
    help: bool = False
    delay_s: float = 1.0
    maxrows: Optional[int] = None  # -r: files listed at most
    note: str = ""  # one line of what luotrace itself said last (attaching, detaching)
    sessions: bool = False  # the sessions list (v), one row per session, instead of the files
    session: Optional[int] = None  # the files of this session only (entered from the sessions list)


def _n(x: Optional[float]) -> str:
    if x is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def dur(ns: Optional[int]) -> str:
    """A duration in at most 6 characters (the table's): whole minutes from
    100 s, tenths of seconds from 1 s, then whole ms, us, ns."""
    if ns is None:
        return "-"
    if ns >= 100e9:
        return f"{ns / 60e9:.0f}m"
    if ns >= 1e9:
        return f"{ns / 1e9:.1f}s"
    if ns >= 1e6:
        return f"{ns / 1e6:.0f}ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.0f}us"
    return f"{ns}ns"


def folios(r: Row) -> str:
    """done/total, '~' when estimated; '-' where no number is known."""
    if r.done is None and r.total is None:
        return "-"
    mark = "~" if r.progress == "est." else ""
    return f"{mark}{_n(r.done)}/{_n(r.total)}"


def _cells(r: Row) -> List[str]:
    state = "STALLED" if r.stall else "running" if r.running else r.state
    return [f"{r.inode} s{r.session}" if r.session is not None else str(r.inode), SHORT.get(r.handler, r.handler),
            fmt_bytes(r.size_bytes), state, r.phase or "-", dur(r.phase_ns), folios(r),
            (_n(r.rate) + "/s") if r.rate else "-", dur(r.eta_ns)]


def _line(cells: List[str], mark: str = " ", columns=COLUMNS) -> str:
    return mark + " ".join(c[:w].ljust(w) if i < len(columns) - 1 else c[:w]
                           for i, (c, (_, w)) in enumerate(zip(cells, columns)))


def header(v: View, wall: Optional[float] = None) -> List[str]:
    wall = time.time() if wall is None else wall
    frozen = [s for s in v.sessions if s["frozen"]]
    blackout = " ".join(f"s{s['id']} {fmt_ns(s['blackout_ns'])}" for s in frozen[:4]) or "none"
    cost = "-" if v.bpf_runs is None else f"{v.bpf_runs} runs" + (
        f" {v.bpf_cpu_pct:.2f}% cpu" if v.bpf_cpu_pct is not None else "")
    return [printable(f"luotrace top  {time.strftime('%H:%M:%S', time.localtime(wall))}  +{v.at_ns / 1e9:.1f}s"
                      f"{'  (ended)' if v.finished else ''}  {v.kernel or '?'}  boot {(v.boot_id or '?')[:8]}  "
                      f"{v.mode or '?'}"),
            f"update {v.state.upper()}  files {v.files} ({fmt_bytes(v.bytes)})  frozen: {blackout}  "
            f"lost {v.lost}{f' (+{v.missed} runs skipped)' if v.missed else ''}  bpf {cost}"]


def _sorted(rows: List[Row], key: str) -> List[Row]:
    if key == "time":
        return sorted(rows, key=lambda r: -(r.phase_ns or 0))
    if key == "size":
        return sorted(rows, key=lambda r: -(r.size_bytes or 0))
    if key == "state":
        return sorted(rows, key=lambda r: (r.state, r.session or 0, r.inode))
    return sorted(rows, key=lambda r: (r.session if r.session is not None else 1 << 62, r.inode))


def visible(v: View, s: Screen) -> List[Row]:
    """The rows the screen lists, in order: active ones first, finished ones after."""
    rows = [r for r in v.rows if (not s.filter or s.filter in f"{r.handler} {r.state} {r.phase} {r.inode}")
            and (s.session is None or r.session == s.session)]
    active = _sorted([r for r in rows if not done(r)], s.sort)
    return active + _sorted([r for r in rows if done(r)], s.sort)


SESSION_COLUMNS = (("SESSION", 8), ("FILES", 6), ("STATE", 11), ("PHASE", 11), ("BLACKOUT", 10), ("FOLIOS", 15),
                   ("ERR", 4), ("ANOM", 4))


def session_table(v: View) -> List[dict]:
    """One entry per session, its files' rows folded: what the sessions list shows and enter opens."""
    out = []
    for x in sorted(v.sessions, key=lambda x: x["id"]):
        rows = [r for r in v.rows if r.session == x["id"]]
        running = [r for r in rows if r.running]
        states = sorted({r.state for r in rows})
        state = "FROZEN" if x["frozen"] else "running" if running else states[0] if len(states) == 1 else \
            "mixed" if states else "-"
        known = [r for r in rows if r.total is not None]
        out.append({"id": x["id"], "files": x["files"] or len(rows), "state": state,
                    "phase": running[0].phase if running else None, "blackout_ns": x.get("blackout_ns"),
                    "frozen": x["frozen"], "done": sum(r.done or 0 for r in known) if known else None,
                    "total": sum(r.total or 0 for r in known) if known else None,
                    "estimated": any(r.progress == "est." for r in known),
                    "errors": sum(1 for r in rows if r.errno), "anomalies": sum(len(r.anomalies) for r in rows)})
    return out


def _session_cells(x: dict) -> List[str]:
    fol = "-" if x["total"] is None else f"{'~' if x['estimated'] else ''}{_n(x['done'])}/{_n(x['total'])}"
    return [f"s{x['id']}", str(x["files"]), x["state"], x["phase"] or "-",
            "-" if x["blackout_ns"] is None else dur(x["blackout_ns"]) + ("+" if x["frozen"] else ""),
            fol, str(x["errors"]), str(x["anomalies"])]


def _session_list(v: View, s: Screen, room: int) -> List[str]:
    table = session_table(v)
    out = [_line([c for c, _ in SESSION_COLUMNS], columns=SESSION_COLUMNS)]
    sel = min(s.selected, len(table) - 1) if table and s.selected >= 0 else -1
    start = max(0, sel - room + 2) if sel >= room - 1 else 0
    for i, x in enumerate(table[start:start + room - 1], start):
        out.append(_line(_session_cells(x), ">" if i == sel else " ", SESSION_COLUMNS))
    if not table:
        out.append("  (no session in an update yet)")
    return out


def selectable(v: View, s: Screen) -> int:
    """How many lines the arrow keys move over: sessions or files, as shown."""
    return len(v.sessions) if s.sessions else len(visible(v, s))


def screen(v: View, s: Screen, width: int = 80, height: int = 24, wall: Optional[float] = None) -> List[str]:
    """The full screen, HEIGHT lines at most, each at most WIDTH wide."""
    if s.help:
        out = header(v, wall) + ["", *HELP]
        return [x[:width] for x in out[:height]]
    out = header(v, wall)
    stalls = [r for r in v.rows if r.stall]
    for r in stalls[:2]:
        out.append(printable(f"STALL {r.inode}: {r.stall}"))
    if len(stalls) > 2:
        out.append(f"STALL and {len(stalls) - 2} more")
    rows = visible(v, s)
    if s.sessions:
        out += _session_list(v, s, height - len(out) - 2)
    elif s.drilled and rows:
        out += _detail(rows[min(s.selected, len(rows) - 1)], v)
    else:
        out.append(_line([c for c, _ in COLUMNS]))
        room = height - len(out) - 2 if s.maxrows is None else min(height - len(out) - 2, s.maxrows + 1)
        shown = 0
        first_done = True
        sel = min(s.selected, len(rows) - 1) if rows and s.selected >= 0 else -1  # -1: none (not interactive)
        start = max(0, sel - room + 2) if sel >= room - 1 else 0
        sessions = {x["id"]: x for x in v.sessions}
        last_session = None
        for i, r in enumerate(rows[start:], start):
            if shown >= room:
                break
            if done(r) and first_done:
                out.append(f"-- finished ({sum(1 for x in rows if done(x))}) --")
                first_done, last_session = False, None
                shown += 1
                if shown >= room:
                    break
            if s.sort == "session" and not done(r) and r.session != last_session and r.session in sessions:
                last_session = r.session
                out.append(_session_line(sessions[r.session]))  # the session's own row above its files
                shown += 1
                if shown >= room:
                    break
            out.append(_line(_cells(r), ">" if i == sel else " "))
            shown += 1
        for r in [r for r in rows if r.anomalies or r.errno]:
            for what in ([f"{r.errno} in {r.failed_phase}"] if r.errno else []) + \
                    [f"{a['code']}: {a['detail']}" for a in r.anomalies]:
                if shown >= room:
                    break
                out.append(printable(f" {'ERROR' if what.startswith(str(r.errno)) and r.errno else 'ANOMALY'} "
                                     f"{r.inode}: {what}"))
                shown += 1
        for m in v.missing[: max(0, room - shown)]:
            out.append(printable(f"MISSING {m['handler']} {m['inode']}: preserved {m['preserved']} folios before the "
                                 "kexec, not retrieved"))
        if not rows:
            out.append("  (no file in an update yet)")
    where = "[v]files" if s.sessions else f"[v]sessions{f' s{s.session}' if s.session is not None else ''}"
    keys = (f"{where} [s]ort:{s.sort} [f]ilter:{s.filter or '-'} [enter] drill [p]ause{'d' if s.paused else ''} "
            f"[+/-] {s.delay_s:g}s [h]elp [q]")
    body = out[: height - 2]
    body += [""] * (height - 2 - len(body))
    body.append(printable(s.note)[:width])
    body.append(keys)
    return [x[:width] for x in body[:height]]


def _session_line(x: dict) -> str:
    black = f"blackout {fmt_ns(x['blackout_ns'])}{' and running' if x['frozen'] else ''}" \
        if x.get("blackout_ns") is not None else "not frozen"
    return f" session {x['id']}: {x['files']} file(s), {'FROZEN, ' if x['frozen'] else ''}{black}"


def _detail(r: Row, v: View) -> List[str]:
    out = [f"{r.handler} inode {r.inode}  session {r.session}  size {fmt_bytes(r.size_bytes)}  state {r.state}",
           f"phase {r.phase or '-'} {'running ' if r.running else ''}{fmt_ns(r.phase_ns)}  folios {folios(r)}"
           f"{' (' + r.progress + ')' if r.progress else ''}  rate {(_n(r.rate) + '/s') if r.rate else '-'}  "
           f"eta {fmt_ns(r.eta_ns) if r.eta_ns is not None else '-'}",
           f"preserved {_v(r.preserved)}  restored {_v(r.restored)}"
           + (f"  (the old kernel preserved {r.before_preserved})" if r.before_preserved is not None else "")]
    if r.errno:
        out.append(f"error {r.errno} in {r.failed_phase}")
    if r.stall:
        out.append(f"stalled: {r.stall}")
    for a in r.anomalies:
        out.append(printable(f"anomaly {a['code']}: {a['detail']}"))
    out.append("[left/esc] back")
    return out


def _v(x) -> str:
    return "-" if x is None else str(x)


HELP = ["keys:", "  up/down   select a file (or a session)", "  enter, right   its details (left, esc: back)",
        "  v   sessions list / files list; enter on a session: its files (left, esc: back)",
        "  s   sort by session, phase time, size, state", "  f   filter (handler, state, phase or inode; enter)",
        "  p   pause (the trace goes on; the view stops)", "  + -   slower / faster refresh",
        "  h ?   this help", "  q   quit (Ctrl-C too)", "",
        "FOLIOS: done/total; ~ marks an estimate from this host's earlier updates",
        "STALLED: the rule that flagged it is on the STALL line above"]


def plain(prev: Optional[View], v: View, wall: Optional[float] = None) -> List[str]:
    """--plain: a line per file change, then one summary line for the interval."""
    wall = time.time() if wall is None else wall
    stamp = time.strftime("%H:%M:%S", time.localtime(wall)) + f" +{v.at_ns / 1e9:.3f}s"
    rows = {r.key: r for r in v.rows}
    out = []
    for key, what in changes(prev, v):
        r = rows[key]
        sess = "-" if r.session is None else r.session
        line = (f"{stamp} {SHORT.get(r.handler, r.handler)} {r.inode} s{sess} {what}: {r.state} "
                f"{r.phase or '-'}{' running' if r.running else ''} {fmt_ns(r.phase_ns)} folios {folios(r)}")
        if r.before_preserved is not None and r.restored is not None and r.state in ("retrieved", "discarded"):
            line += f" restored {r.restored} of {r.before_preserved} preserved"
        if what == "anomaly":
            line += " " + ", ".join(a["code"] for a in r.anomalies)
        if what == "stall":
            line += f" STALLED ({r.stall})"
        if what == "error":
            line += f" {r.errno} in {r.failed_phase}"
        out.append(printable(line))
    for m in v.missing if v.finished else []:
        out.append(printable(f"{stamp} {m['handler']} {m['inode']} missing: preserved {m['preserved']} folios, "
                             "not retrieved"))
    frozen = sum(1 for s in v.sessions if s["frozen"])
    out.append(f"{stamp} update {v.state} files {v.files} bytes {v.bytes} frozen {frozen} lost {v.lost} "
               f"missed {v.missed} "
               f"bpf_runs {_v(v.bpf_runs)} stalls {sum(1 for r in v.rows if r.stall)}"
               + (" ended" if v.finished else ""))
    return out
