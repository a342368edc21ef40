"""luotrace top: the view of an update, live and played back.

Unit tier: recordings played back (--replay) end on exactly `report`'s
numbers in every output (--json, --plain, --once); progress says where its
number comes from and never shows the total before a phase returns; the
stall rules fire where they should and not before; frames fit 80x24.
Kernel tier: the full screen in a real pseudo-terminal while the reference
model runs an update (kexec, cancel, hwpoison, a late fallocate), the
terminal restored after q and after SIGTERM; top beside a running serve
adds no BPF program; a fill pass made slow on purpose is flagged stalled,
the normal runs are not."""
from __future__ import annotations

import copy
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

import pytest

from exporters import top_text as tt
from tests.conftest import LUOTRACE, MODEL, REPO, run_cli, wait_tracing
from tracer import schemas
from tracer.analysis import progress as pg
from tracer.analysis.replay import replay
from tracer.analysis.simulate import SimSpec, simulate


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    d = tmp_path_factory.mktemp("top")
    out = {}
    for mode in ("light", "folio", "trace"):
        out[mode] = str(d / f"{mode}.luo")
        simulate(SimSpec(files=5, size=40 << 20, mode=mode, seed=4, errors=1, anomalies=["holes", "pfn_zero"]),
                 out[mode])
    return out


def _final_json(lines):
    frames = [json.loads(x) for x in lines if x.strip()]
    assert frames and frames[-1]["finished"] and all(schemas.problem("top", f) is None for f in frames)
    return frames


@pytest.mark.parametrize("mode", ["light", "folio", "trace"])
def test_replay_ends_on_the_report_in_every_output(sims, mode):
    path = sims[mode]
    want = pg.final_of(replay(path))
    r = run_cli("top", "--replay", path, "--speed", "0", "--json", "0.001", check=True)
    frames = _final_json(r.stdout.splitlines())
    got = {row["key"]: {"state": row["state"], "preserved": row["preserved"], "restored": row["restored"],
                        "anomalies": sorted(a["code"] for a in row["anomalies"])} for row in frames[-1]["rows"]}
    assert got == want and len(frames) > 1  # played in steps, ended on the report
    plain = run_cli("top", "--replay", path, "--speed", "0", "--plain", "0.001", check=True).stdout.splitlines()
    assert plain[-1].split(" ", 2)[2].startswith("update done") and plain[-1].endswith("ended")
    appeared = {ln.split()[3] for ln in plain if " appeared: " in ln}
    assert appeared == {k.split(":")[2] for k in want}  # a line for each file as it appeared
    once = run_cli("top", "--replay", path, "--once", check=True).stdout
    for key, row in want.items():
        line = next(ln for ln in once.splitlines() if ln.startswith(f" {key.split(':')[2]} "))
        assert row["state"] in line
    for code in {c for row in want.values() for c in row["anomalies"]}:
        assert "ANOMALY" in once and code in once


def _file(phase_open: str, since: int, nr=None, phases=(), streamed=None, size=8 << 20):
    probe = {"count_pass": "gmem_walk", "fill_pass": "gmem_walk", "luo_freeze": "gmem_luo_freeze"}.get(
        phase_open, "gmem_preserve")
    return {"handler": "guest_memfd", "dev": 16, "inode": 7, "session": 1, "token": 1, "size_bytes": size,
            "result": "none", "nr_folios": nr, "folios_preserved": 0, "folios_restored": 0, "errno": None,
            "failed_phase": None, "anomalies": [], "phases": list(phases),
            "in_progress": ["gmem_preserve", probe], "in_progress_since_ns": {"gmem_preserve": since, probe: since},
            **({"streamed_events": streamed} if streamed else {})}


def _rep(*files, sessions=()):
    return {"recording": {"mode": "folio", "kernel": "k"}, "files": list(files), "sessions": list(sessions),
            "events": {"lost": 0}, "bpf": {"run_cnt": 0, "run_time_ns": 0}}


COUNTED = [{"name": "count_pass", "start_ns": 0, "duration_ns": 1000, "count": 2048}]


def test_fill_pass_progress_is_an_estimate_that_never_reaches_the_total():
    hist = pg.History.of([{"files": [{"handler": "guest_memfd", "phases": [
        {"name": "fill_pass", "start_ns": 0, "duration_ns": 2_000_000, "count": 1000}]}]}])  # 2 us a folio
    rep = _rep(_file("fill_pass", 0, nr=2048, phases=COUNTED))
    v = pg.view(rep, 1_000_000, hist)  # 1 ms in: ~500 folios
    r = v.rows[0]
    assert (r.phase, r.progress, r.done, r.total) == ("fill_pass", "est.", 500, 2048)
    assert tt.folios(r) == "~500/2.0k" and r.eta_ns == int(1548 / 500_000 * 1e9)
    late = pg.view(rep, 60_000_000, hist).rows[0]  # far past the prediction: capped below the total
    assert late.done == 2047 and late.progress == "est."
    assert pg.view(rep, 1_000_000).rows[0].done is None  # no history: no number at all


def test_trace_mode_counts_are_exact_and_their_rate_measured():
    a = pg.view(_rep(_file("fill_pass", 0, nr=2048, phases=COUNTED, streamed={"kho_preserve_folio": 100})), 1_000_000)
    b = pg.view(_rep(_file("fill_pass", 0, nr=2048, phases=COUNTED, streamed={"kho_preserve_folio": 600})),
                2_000_000, prev=a)
    r = b.rows[0]
    assert (r.done, r.total, r.progress) == (600, 2048, "exact") and r.rate == pytest.approx(500e3)


def test_stall_rules_fire_after_their_threshold_and_not_before():
    hist = pg.History.of([{"files": [{"handler": "guest_memfd", "phases": [
        {"name": "fill_pass", "start_ns": 0, "duration_ns": 200_000_000, "count": 2048}]}]}])  # 0.2 s
    rep = _rep(_file("fill_pass", 0, nr=2048, phases=COUNTED))
    assert pg.view(rep, 990_000_000, hist).rows[0].stall is None  # 5 x 0.2 s = 1 s not yet passed
    assert pg.view(rep, 1_100_000_000, hist).rows[0].stall.startswith("history: fill_pass has run 1.1 s")
    # no history, no progress signal: flagged once the phase has been open --stall seconds
    assert pg.view(rep, 29_000_000_000, stall_s=30).rows[0].stall is None
    assert pg.view(rep, 31_000_000_000, stall_s=30).rows[0].stall.startswith("open: fill_pass")
    # exact progress that stops moving
    f = _file("fill_pass", 0, nr=2048, phases=COUNTED, streamed={"kho_preserve_folio": 10})
    prev = None
    for t in range(0, 7):
        prev = pg.view(_rep(f), t * 1_000_000_000, prev=prev, stall_s=5)
        assert (prev.rows[0].stall is not None) == (t >= 5), t  # unchanged since t=0
    assert prev.rows[0].stall.startswith("no progress: fill_pass at 10 of 2048")


def test_across_the_kexec_each_retrieve_against_what_was_preserved():
    old = {"files": [{"handler": "guest_memfd", "dev": 16, "inode": 7, "token": 1, "result": "ok",
                      "folios_preserved": 512},
                     {"handler": "memfd", "dev": 1, "inode": 9, "token": 1, "result": "ok", "folios_preserved": 16}]}
    new = _rep({**_file("retrieve", 0), "result": "retrieved", "token": 1, "in_progress": [], "in_progress_since_ns": {},
                "folios_restored": 512, "retrieved_inode": 70})
    v = pg.view(new, 1000, before=old, finished=True)
    assert v.rows[0].before_preserved == 512 and v.rows[0].restored == 512
    # the memfd's token is the guest_memfd's too (another session's): it is missing all the same
    assert v.missing == [{"handler": "memfd", "inode": 9, "token": 1, "preserved": 16}]
    lines = tt.plain(None, v)
    assert any("9 missing: preserved 16 folios, not retrieved" in ln for ln in lines)


def test_a_freeze_the_jump_cut_ends_when_the_new_kernel_takes_its_files_back():
    """LUO freezes the sessions right after kernel_kexec(); the CPUs may stop
    before a freeze's return is recorded.  In the new kernel that session is
    frozen until its files are retrieved or discarded, then the update is
    done, not frozen for ever (the full lane's last line said `frozen 1`)."""
    cut = {"id": 1, "files": [7], "cancelled": False, "blackout_start_ns": 1_000, "blackout_ns": None}
    waiting = {**_file("retrieve", 0), "result": "ok", "in_progress": [], "in_progress_since_ns": {}}
    back = {**waiting, "result": "retrieved", "folios_restored": 512, "retrieved_inode": 70}
    old = {"files": [{"handler": "guest_memfd", "dev": 16, "inode": 7, "result": "ok", "folios_preserved": 512}]}
    v = pg.view(_rep(waiting, sessions=[cut]), 5_000, before=old)
    assert v.sessions[0]["frozen"] and v.sessions[0]["blackout_ns"] == 4_000
    v = pg.view(_rep(back, sessions=[cut]), 6_000, before=old, finished=True)
    assert not v.sessions[0]["frozen"] and v.state == "done", (v.state, v.sessions)


def test_a_frame_fits_80x24_and_a_thousand_files_scroll():
    files = []
    for i in range(1000):
        f = copy.deepcopy(_file("fill_pass", i, nr=2048, phases=COUNTED))
        f["inode"], f["token"], f["session"] = 100 + i, i, i % 40
        files.append(f)
    v = pg.view(_rep(*files), 10_000_000)
    lines = tt.screen(v, tt.Screen(selected=900))
    assert len(lines) == 24 and all(len(x) <= 80 for x in lines)
    assert sum(ln.startswith(">") for ln in lines) == 1, lines  # the selection scrolled into view


def test_the_sessions_list_folds_each_sessions_files_and_opens_them():
    files, sessions = [], []
    for i in range(12):
        f = copy.deepcopy(_file("fill_pass", i, nr=2048, phases=COUNTED))
        f["inode"], f["token"], f["session"] = 100 + i, i, i % 3
        files.append(f)
    for sid in range(3):
        sessions.append({"id": sid, "files": [100 + i for i in range(12) if i % 3 == sid], "cancelled": False,
                         "blackout_start_ns": 1_000 if sid == 2 else None, "blackout_ns": None})
    files[2]["errno"], files[2]["failed_phase"] = "EHWPOISON", "fill_pass"  # session 2's
    v = pg.view(_rep(*files, sessions=sessions), 10_000_000)
    table = tt.session_table(v)
    assert [(x["id"], x["files"], x["state"], x["errors"], x["total"]) for x in table] == [
        (0, 4, "running", 0, 4 * 2048), (1, 4, "running", 0, 4 * 2048), (2, 4, "FROZEN", 1, 4 * 2048)]
    lines = tt.screen(v, tt.Screen(sessions=True, selected=2))
    rows = [ln for ln in lines if re.match(r"[ >]s\d ", ln)]
    assert len(rows) == 3 and rows[2].startswith(">s2 ") and "FROZEN" in rows[2] and all(len(x) <= 80 for x in lines)
    assert tt.selectable(v, tt.Screen(sessions=True)) == 3
    inside = tt.screen(v, tt.Screen(session=2, selected=-1))  # enter on s2: its files only
    listed = {int(m.group(1)) for ln in inside if (m := re.match(r" (\d+) s2 ", ln))}
    assert listed == {102, 105, 108, 111} and not any(re.match(r" \d+ s[01] ", ln) for ln in inside)
    assert tt.selectable(v, tt.Screen(session=2)) == 4


def test_keys_open_the_sessions_list_and_a_sessions_files(sims):
    """In a real pseudo-terminal, a recording played back: v lists the
    sessions, enter opens the selected one's files, left goes back, q quits."""
    rc, text, restored, _raw = _pty_top(["--replay", sims["folio"], "--speed", "0", "0.05"],
                                        send=[b"v", b"\r", b"\x1b[D", b"q"])
    assert rc == 0 and restored, text[-2000:]
    at = text.index("SESSION  FILES  STATE")  # the sessions list's header, drawn after v
    assert re.search(r">s1 +5 ", text[at:]), text[at:][-1500:]  # its one session, selected
    # enter: s1's files (the keys line says whose; curses redraws only what changed on it)
    assert "sessions s1 [s]ort" in text[at:], text[at:][-1500:]


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "x.luo"
    bad.write_bytes(b"LUOTRACE\x02\x00garbage")
    for args, says in [(["--replay", str(bad)], "x.luo"), (["--replay", "a", "--replay", "b", "--replay", "c"], "at most two"),
                       (["0"], "bad interval"), (["1", "0"], "bad count"), (["--from", "http://127.0.0.1:9", "--once"],
                                                                           "does not answer")]:
        r = run_cli("top", *args)
        assert r.returncode not in (0, None) and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


# ---- the kernel tier: the view of a real traced run ----

SCENARIO = ["kexec:gmem:4M,memfd:1M", "cancel:gmem:2M", "keep:gmem:2M:hwpoison", "keep:gmem:1M:late_fallocate"]
ESC = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-B]|\x1b[=>]")


def _pty_top(args, send=None, after=None, timeout=120):
    """Run top in a pseudo-terminal of 80x24; SEND (b'q', a signal, or a list
    of keys sent a second apart) AFTER seconds, or once the run has ended.
    (returncode, the stream with its escapes removed, whether the terminal
    came back as it was)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    before = termios.tcgetattr(slave)
    p = subprocess.Popen(LUOTRACE + ["top"] + args, stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                         env=dict(os.environ, TERM="xterm"), start_new_session=True)
    buf, t0, sent = b"", time.monotonic(), False
    try:
        while time.monotonic() - t0 < timeout:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    buf += os.read(master, 1 << 16)
                except OSError:
                    break
            ended = b"the run has ended" in buf
            if not sent and ((after is not None and time.monotonic() - t0 > after) or (after is None and ended)):
                if isinstance(send, list):
                    for key in send:
                        os.write(master, key)
                        time.sleep(1)
                elif isinstance(send, bytes):
                    os.write(master, send)
                else:
                    p.send_signal(send)
                sent = True
            if p.poll() is not None:
                while select.select([master], [], [], 0.3)[0]:
                    try:
                        chunk = os.read(master, 1 << 16)
                    except OSError:
                        break
                    if not chunk:
                        break
                    buf += chunk
                break
        else:
            p.kill()
            raise AssertionError("top did not end: " + ESC.sub(b"", buf)[-2000:].decode(errors="replace"))
        return p.wait(), ESC.sub(b"", buf).decode(errors="replace"), termios.tcgetattr(slave) == before, buf
    finally:
        os.close(master)
        os.close(slave)


def test_the_full_screen_follows_an_update_and_ends_on_its_report(model, gmem, tmp_path):
    out = str(tmp_path / "top.luo")
    rc, text, restored, raw = _pty_top(["0.1", "-o", out, "--model", MODEL, "--", MODEL, "--pause-ms", "200",
                                        *SCENARIO], send=b"q")
    assert rc == 0 and restored and b"\x1b[?1049l" in raw, text[-2000:]
    for seen in ("PRESERVING", "FROZEN", "folio_added_while_frozen", "EHWPOISON"):
        assert seen in text, seen  # the update's states, the anomaly and the error as they came
    phases = {p for p in ("count_pass", "fill_pass", "vmalloc", "luo_freeze", "unpreserve", "retrieve", "finish")
              if p in text}
    assert len(phases) >= 5, phases  # each file's phases as they ran (a frame every 0.1 s, each 0.2 s long)
    # the last frame, left on the terminal after the full screen closed: the report's numbers
    final = text[text.rindex("luotrace top  "):]
    rep = json.loads(run_cli("report", "--json", out, check=True).stdout)
    for key, row in pg.final_of(rep).items():
        line = next(ln for ln in final.splitlines() if ln.startswith(f" {key.split(':')[2]} "))
        assert row["state"] in line, (key, line)
        if row["preserved"] is not None and "gmem" in line:
            assert f"{row['preserved'] if row['preserved'] < 1000 else ''}" in line or "k/" in line, line
    assert f"files {rep['totals']['files']} " in final


def test_sigterm_restores_the_terminal(model, gmem):
    rc, text, restored, raw = _pty_top(["0.2", "--model", MODEL, "--", MODEL, "--pause-ms", "300", *SCENARIO],
                                       send=signal.SIGTERM, after=3)
    assert restored and b"\x1b[?1049l" in raw and "Traceback" not in text, text[-1500:]


def _progs_of(pid: int) -> set:
    """The BPF programs process PID holds: bpftool's view (its pids), and its own fds."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True).stdout
    held = {p["id"] for p in json.loads(out) if any(x.get("pid") == pid for x in p.get("pids", []))}
    fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    return held | {f for f in fds if "bpf-prog" in f}


def test_beside_serve_top_adds_no_program_and_shows_serve_s_update(model, gmem, tmp_path):
    port = 9600 + os.getpid() % 300
    serve = subprocess.Popen(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{port}", "--model", MODEL, "--", MODEL,
                                         "--pause-ms", "200", *SCENARIO], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_tracing(serve)
        assert _progs_of(serve.pid)  # serve's probes, seen the way top's would be
        top = subprocess.Popen(LUOTRACE + ["top", "--from", f"http://127.0.0.1:{port}", "--plain", "0.3", "12"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        held = set()
        for _ in range(8):
            time.sleep(0.25)
            if top.poll() is None:
                held |= _progs_of(top.pid)
        out, err = top.communicate(timeout=60)
        assert top.returncode == 0, err
        assert held == set()  # no program of its own: one request a frame
        assert "reading the service" in err and " appeared: " in out and "update " in out
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=60)


def test_a_slow_fill_pass_is_flagged_and_normal_runs_are_not(model, gmem):
    r = run_cli("top", "--plain", "0.25", "--fail-on-stall", "1", "--model", MODEL, "--", MODEL,
                "keep:gmem:4M:slow_fill=2500", "kexec:gmem:2M")
    assert r.returncode == 3 and "stalled (open: fill_pass has run" in r.stderr, r.stderr[-1500:]
    assert re.search(r"appeared: preparing fill_pass running|stall: .*fill_pass.*STALLED", r.stdout)
    ok = run_cli("top", "--plain", "0.25", "--fail-on-stall", "1", "--model", MODEL, "--", MODEL, *SCENARIO)
    assert ok.returncode == 0 and "STALLED" not in ok.stdout, ok.stderr[-1500:]


def _split_at_the_retrieves(src: str, tmp_path):
    """A simulated update cut in two as a kexec cuts it: the old kernel's
    recording (everything before the first retrieve, no trailer: the jump
    killed its recorder) and the new kernel's (the rest, another boot)."""
    from tracer.probes import catalog
    from tracer.recording import format as rec
    r = rec.read(src)
    ev = r.events
    retrieve = {catalog.PROBE_IDS[n] for n in ("gmem_retrieve", "memfd_retrieve")}
    cut = int(next(i for i, p in enumerate(ev["probe"]) if p in retrieve))
    paths = []
    for i, (part, boot) in enumerate(((ev[:cut], "old-boot"), (ev[cut:], "new-boot"))):
        head = copy.deepcopy(r.header)
        head["clock"]["boot_id"] = boot
        path = str(tmp_path / f"update-{i + 1}.luo")
        w = rec.Writer(path, head)
        w.add(part.tobytes())
        if i:
            w.close(r.maps, r.end)
        else:
            w.flush(sync=True)
        paths.append(path)
    return paths


def test_both_sides_of_an_update_played_back_end_on_their_joined_report(tmp_path):
    from tracer.analysis.join import join_report
    src = str(tmp_path / "u.luo")
    simulate(SimSpec(files=4, size=16 << 20, mode="light", seed=9), src)
    before, after = _split_at_the_retrieves(src, tmp_path)
    r = run_cli("top", "--replay", before, "--replay", after, "--json", "--speed", "0", "0.000001", check=True)
    frames = _final_json(r.stdout.splitlines())
    want = pg.final_of(join_report([before, after]))
    got = {row["key"]: {"state": row["state"], "preserved": row["preserved"], "restored": row["restored"],
                        "anomalies": sorted(a["code"] for a in row["anomalies"])} for row in frames[-1]["rows"]}
    assert got == want and frames[-1]["missing"] == []
    kept = [row for row in frames[-1]["rows"] if row["before_preserved"] is not None]
    assert kept and all(row["state"] == "retrieved" for row in kept)
    assert any(f["state"] == "retrieving" for f in frames[:-1])  # the new kernel's side, as it went


@pytest.mark.parametrize("mode", ["light", "folio", "trace"])
def test_the_live_join_equals_report_a_b_at_every_point_of_the_new_kernels_run(tmp_path, mode):
    """top in the new kernel keeps `report BEFORE OUTPUT` current (LiveJoin:
    the old recording fed once, this run's records as they come) instead of
    reading both recordings each frame.  Here the new kernel's recording grows
    as a live run writes it, and at each point the kept join equals `report`
    joining the two files as they are then, byte for byte."""
    from tracer.analysis.join import LiveJoin, join_report
    from tracer.recording import format as rec
    src = str(tmp_path / "u.luo")
    simulate(SimSpec(files=4, size=16 << 20, mode=mode, seed=9, errors=1), src)
    before, after = _split_at_the_retrieves(src, tmp_path)
    full = rec.read(after)
    ev, live = full.events, str(tmp_path / "live.luo")
    points = sorted({0, 1, len(ev) // 3, len(ev) // 2, len(ev) - 1, len(ev)})

    def written(n: int) -> None:  # the live run's recording as it stands after N records
        w = rec.Writer(live, full.header, force=True)
        w.add(ev[:n].tobytes())
        w.flush(sync=True)

    written(points[1])
    join = LiveJoin(before, full.header, live)
    join.catch_up()
    fed = points[1]
    for n in points[1:]:
        join.feed(ev[fed:n])
        fed = n
        written(n)
        got = json.dumps(join.report(None), sort_keys=True)
        assert got == json.dumps(join_report([before, live]), sort_keys=True), n
    assert json.loads(got)["files"] and any(f["result"] == "retrieved" for f in json.loads(got)["files"])


def test_in_the_boot_an_update_brought_up_top_shows_that_update_whole_from_serve(model, gmem, tmp_path):
    """serve --state-dir finds the previous boot's recording (one that saw the
    kexec) and answers /update.json with it joined to this boot's; top reads
    that, so the old kernel's files are rows, each with what it preserved."""
    from tracer.recording import format as rec
    old = str(tmp_path / "old.luo")
    run_cli("record", "-o", old, "--model", MODEL, "--quiet", "--", MODEL, "kexec:gmem:1M", "keep:gmem:512K",
            check=True)
    r = rec.read(old)
    head = copy.deepcopy(r.header)
    head["clock"]["boot_id"] = "0000aaaa-0000-4000-8000-000000000001"  # another boot's
    state = tmp_path / "state"
    state.mkdir()
    w = rec.Writer(str(state / "boot-0000aaaa-0000-4000-8000-000000000001-20261206T000000.luo"), head)
    w.add(r.events.tobytes())
    w.close(r.maps, r.end)
    kept = {f["inode"]: f["folios_preserved"] for f in replay(old)["files"] if f["result"] == "ok"}
    assert kept
    port = 9300 + os.getpid() % 300
    serve = subprocess.Popen(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
                                         "--model", MODEL, "--", MODEL, "--pause-ms", "100", "cancel:gmem:1M"],
                             cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_tracing(serve)
        time.sleep(1.5)  # the state directory read in the background
        top = run_cli("top", "--from", f"http://127.0.0.1:{port}", "--json", "0.3", "3", check=True)
        last = json.loads(top.stdout.splitlines()[-1])
        rows = {row["inode"]: row for row in last["rows"]}
        assert "came up by a live update" in top.stderr
        for ino, n in kept.items():
            assert rows[ino]["state"] == "preserved" and rows[ino]["before_preserved"] == n == rows[ino]["preserved"]
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=60)


def test_with_its_own_probes_in_the_new_kernel_top_joins_as_it_goes(model, gmem, tmp_path):
    """top --before OLD with probes of its own: every frame, not only the last,
    is the old kernel's update joined with this run (kept current as records
    arrive): the old files as rows with what they preserved, this run's file
    beside them as it goes; the last frame is `report OLD THIS`."""
    from tracer.analysis.join import join_report
    from tracer.recording import format as rec
    src, old, out = str(tmp_path / "src.luo"), str(tmp_path / "old.luo"), str(tmp_path / "new.luo")
    run_cli("record", "-o", src, "--model", MODEL, "--quiet", "--", MODEL, "kexec:gmem:1M", "keep:gmem:512K",
            check=True)
    r = rec.read(src)
    head = copy.deepcopy(r.header)
    head["clock"]["boot_id"] = "0000aaaa-0000-4000-8000-000000000002"  # another boot's
    w = rec.Writer(old, head)
    w.add(r.events.tobytes())
    w.close(r.maps, r.end)
    kept = {f["inode"]: f["folios_preserved"] for f in replay(old)["files"] if f["result"] == "ok"}
    top = run_cli("top", "--json", "0.2", "--before", old, "-o", out, "--model", MODEL, "--", MODEL,
                  "--pause-ms", "300", "cancel:gmem:1M", check=True)
    frames = _final_json(top.stdout.splitlines())
    running = [f for f in frames[:-1] if any(row["inode"] not in kept for row in f["rows"])]
    assert running, "no frame showed this run's file before the end"
    clocks = [f["at_ns"] for f in frames[:-1]]
    assert clocks == sorted(clocks) and all(b > a for a, b in zip(clocks[-6:-1], clocks[-5:]))  # runs between records
    for f in running:  # joined while it ran: the old files are there in every one of them
        rows = {row["inode"]: row for row in f["rows"]}
        assert all(rows[i]["before_preserved"] == n for i, n in kept.items()), f["rows"]
    want = pg.final_of(join_report([old, out]))
    assert {row["key"]: row["state"] for row in frames[-1]["rows"]} == {k: v["state"] for k, v in want.items()}


def test_a_frame_is_written_at_the_kexec_itself(model, gmem):
    """The CPUs may stop before the next interval: at kernel_kexec() top
    writes a frame at once, with the state at the jump.  With a 60 s
    interval, the run (a few seconds) has no interval frame after the first:
    the frame in between is the kexec's."""
    r = run_cli("top", "--json", "60", "--model", MODEL, "--", MODEL, "--pause-ms", "200", "kexec:gmem:1M",
                check=True)
    frames = _final_json(r.stdout.splitlines())
    # LUO freezes every session right after kernel_kexec(): the frame has them frozen, the file preserved
    jumps = [f for f in frames[1:-1] if f["state"] in ("kexec", "frozen")]
    assert len(frames) == 3 and jumps, [(f["at_ns"], f["state"]) for f in frames]
    row = jumps[0]["rows"][0]
    assert row["preserved"] == 256 and row["state"] == "preserved" and jumps[0]["sessions"][0]["frozen"], row


def test_plain_and_json_of_a_live_run_end_on_its_report(model, gmem, tmp_path):
    """Probes of its own, no serve: --json's last frame and --plain's lines
    end on the numbers `report --json` gives for the recording the same run
    kept; the probes are detached at the end."""
    out = str(tmp_path / "j.luo")
    r = run_cli("top", "--json", "0.2", "-o", out, "--model", MODEL, "--", MODEL, *SCENARIO, check=True)
    frames = _final_json(r.stdout.splitlines())
    rep = json.loads(run_cli("report", "--json", out, check=True).stdout)
    got = {row["key"]: {"state": row["state"], "preserved": row["preserved"], "restored": row["restored"],
                        "anomalies": sorted(a["code"] for a in row["anomalies"])} for row in frames[-1]["rows"]}
    assert got == pg.final_of(rep) and "probes detached" in r.stderr
    out2 = str(tmp_path / "p.luo")
    p = run_cli("top", "--plain", "0.2", "-o", out2, "--model", MODEL, "--", MODEL, *SCENARIO, check=True)
    rep2 = json.loads(run_cli("report", "--json", out2, check=True).stdout)
    lines = p.stdout.splitlines()
    assert lines[-1].endswith("ended") and f" files {rep2['totals']['files']} " in lines[-1]
    for key, row in pg.final_of(rep2).items():
        last = [ln for ln in lines if f" {key.split(':')[2]} s" in ln][-1]
        assert f": {row['state']} " in last, (key, last)
