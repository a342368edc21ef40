"""A live update spans two kernels: the old one's recording ends at the kexec,
the new one's starts after boot, and `luotrace report OLD NEW` joins them.

The reference model traced here with real uprobes calls kernel_kexec() between
the preserve and the freeze, as the kernel does, but it does not reboot.  The
real two-kernel join runs in the VM lane (`make vmtest`); here a model
recording is cut at the new kernel's first call and its second half given a
new boot (restarted CLOCK_MONOTONIC, new boot id, the same TSC): that is the
fake part, and the test names say so.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from tracer.probes import catalog
from tracer.kernel import clock
from tracer.recording import format as rec
from tracer.analysis.join import join_report
from tracer.analysis.replay import replay

from .conftest import MODEL, load_json, run_cli

KEXEC_ID = catalog.PROBE_IDS["kexec"]
RETRIEVE_IDS = {catalog.PROBE_IDS[n] for n in ("memfd_retrieve", "gmem_retrieve")}
SCENARIO = ["kexec:memfd:4M,memfd:1M", "kexec:gmem:2M,gmem:1M:holes", "cancel:memfd:1M"]


@pytest.fixture(scope="module")
def update_run(model, gmem, tmp_path_factory):
    d = tmp_path_factory.mktemp("join")
    out, truth = str(d / "run.luo"), str(d / "truth.json")
    run_cli("record", "-o", out, "--model", MODEL, "--quiet", "--", MODEL, "--json", truth, *SCENARIO, check=True)
    return out, load_json(truth), d


def _chunks(path: str):
    """(type, offset, length) of every chunk: the file layout, as in tracer/recording/format.py."""
    data = open(path, "rb").read()
    return data, [(kind, pos, length) for kind, pos, _start, length in rec.walk(data)]


def _kexec_maps_chunk(path: str):
    """(data, pos, length) of the map dump written when the kexec event arrived:
    the first one after the events chunk that holds it."""
    data, chunks = _chunks(path)
    seen = False
    for kind, pos, length in chunks:
        body = data[pos + rec.CHUNK.size: pos + rec.CHUNK.size + length]
        if kind == rec.CH_EVENTS and (np.frombuffer(body, dtype=rec.EVENT_DTYPE)["probe"] == KEXEC_ID).any():
            seen = True
        elif kind == rec.CH_MAPS and seen:
            return data, pos, length
    raise AssertionError("no map dump after the kexec")


def test_kexec_is_recorded_before_the_freeze_with_clock_anchors(update_run):
    path, _truth, _d = update_run
    r = rec.read(path)
    ev = r.events
    kexec_at = np.flatnonzero(ev["probe"] == KEXEC_ID)
    assert len(kexec_at) == 1  # one jump, the model's kernel_kexec()
    freeze = np.flatnonzero(ev["probe"] == catalog.PROBE_IDS["luo_file_freeze"])
    assert kexec_at[0] < freeze.min()
    ck = r.header["clock"]
    assert ck["boot_id"] == clock.boot_id()
    a, b = ck["anchors"]
    assert b["monotonic_ns"] > a["monotonic_ns"] and a["uncertainty_ns"] < 1_000_000
    assert 0.1 < clock.tsc_per_ns(a, b) < 10  # a TSC between 100 MHz and 10 GHz


def test_a_recording_cut_right_after_the_kexec_keeps_the_folio_counts(update_run, tmp_path):
    """The machine may stop any time after kernel_kexec(): the map dump written
    at that moment keeps every preserved file's folio count."""
    path, truth, _d = update_run
    data, pos, length = _kexec_maps_chunk(path)
    cut = tmp_path / "cut.luo"
    cut.write_bytes(data[: pos + rec.CHUNK.size + length])
    rep = replay(str(cut))
    assert rep["truncated"]
    by_ino = {f["inode"]: f for f in rep["files"]}
    before = [t for t in truth["files"] if t["session"] == 1]  # the model preserves session 2 after the jump
    assert len(before) == 2
    for t in before:
        assert by_ino[t["inode"]]["folios_preserved"] == t["folios_preserved"] > 0, t


def _split_at_new_kernel(path: str, out1: str, out2: str, shift: int) -> None:
    """Fake reboot: events before the first retrieve go to OLD (with the kexec-time
    map dump); the rest to NEW, whose clock restarts `shift` ns earlier."""
    r = rec.read(path)
    ev = r.events
    cut = int(np.flatnonzero(np.isin(ev["probe"], list(RETRIEVE_IDS))).min())
    data, pos, length = _kexec_maps_chunk(path)
    kexec_maps = json.loads(data[pos + rec.CHUNK.size: pos + rec.CHUNK.size + length])
    w = rec.Writer(out1, r.header)
    w.add(ev[:cut].tobytes())
    w.write_maps(kexec_maps)
    w._f.close()  # no trailer: the kexec ended it
    h2 = copy.deepcopy(r.header)
    ck = h2["clock"]
    a = r.header["clock"]["anchors"]
    rate = clock.tsc_per_ns(a[0], a[1])
    t = int(ev["ts"][cut]) - 1000  # the new kernel's recorder starts just before its first event
    ck["boot_id"] = "00000000-0000-0000-0000-00000000b007"
    ck["base_monotonic_ns"] -= shift
    ck["base_realtime_ns"] += 10**9
    new_anchor = {"monotonic_ns": t - shift, "tsc": a[1]["tsc"] + round((t - a[1]["monotonic_ns"]) * rate),
                  # the new kernel's wall clock came from the RTC: 0.6 s off
                  "realtime_ns": a[1]["realtime_ns"] + (t - a[1]["monotonic_ns"]) + 600_000_000,
                  "uncertainty_ns": 100}
    ck["anchors"] = [dict(new_anchor, monotonic_ns=new_anchor["monotonic_ns"] - 10**9,
                          tsc=new_anchor["tsc"] - round(10**9 * rate)), new_anchor]
    second = ev[cut:].copy()
    second["ts"] -= np.uint64(shift)
    final = r.maps
    rows1 = {(x["handler"], x["dev"], x["ino"]): x for x in kexec_maps["folio_stats"]}
    maps2 = copy.deepcopy(final)
    for row in maps2["folio_stats"]:  # the new kernel's maps hold only what happened after boot
        old = rows1.get((row["handler"], row["dev"], row["ino"]))
        for k in row:
            if old and k not in ("handler", "dev", "ino"):
                row[k] -= old[k]
    maps2["folio_hist"] = []
    maps2["counters"] = {k: 0 for k in final["counters"]}
    w2 = rec.Writer(out2, h2)
    w2.add(second.tobytes())
    w2.close(maps2, r.end)


def test_join_of_a_fake_reboot_matches_the_single_recording(update_run):
    path, truth, d = update_run
    old, new = str(d / "old.luo"), str(d / "new.luo")
    shift = 5 * 10**9
    _split_at_new_kernel(path, old, new, shift)
    whole = replay(path)
    joined = join_report([new, old])  # any order: joined oldest first
    assert [b["recording"] for b in joined["boots"]] == [old, new]
    assert joined["boots"][0]["ended_by"] == "kexec"
    assert joined["boots"][1]["joined_by"] == "tsc"
    assert abs(joined["boots"][1]["clock_offset_ns"] - shift) < 2000  # TSC, not the 0.6 s-off wall clock
    assert not joined["truncated"]
    wf = {f["inode"]: f for f in whole["files"]}
    assert len(joined["files"]) == len(whole["files"])
    for f in joined["files"]:
        w = wf[f["inode"]]
        for k in ("result", "folios_preserved", "folios_restored", "folios_unpreserved", "session", "errno"):
            assert f[k] == w[k], (k, f, w)
        assert [p["name"] for p in f["phases"]] == [p["name"] for p in w["phases"]]
        for p, q in zip(f["phases"], w["phases"]):
            assert p["duration_ns"] == q["duration_ns"] and abs(p["start_ns"] - q["start_ns"]) < 2000
    for t in truth["files"]:
        f = next(x for x in joined["files"] if x["inode"] == t["inode"])
        assert f["folios_preserved"] == t["folios_preserved"] and f["folios_restored"] == t["folios_restored"]
        if t["outcome"] == "kexec":
            names = [p["name"] for p in f["phases"]]
            assert names.index("preserve") < names.index("luo_freeze") < names.index("retrieve") < names.index("finish")
            freeze = next(p for p in f["phases"] if p["name"] == "luo_freeze")
            retrieve = next(p for p in f["phases"] if p["name"] == "retrieve")
            assert f["blackout_ns"] == retrieve["start_ns"] - freeze["start_ns"] > 0
            assert joined["kexec_ns"][0] < freeze["start_ns"]
        else:
            assert f["blackout_ns"] is None
    text = run_cli("report", old, new, check=True).stdout
    assert "boot 2:" in text and "blackout" in text and "(tsc)" in text


def test_same_recording_twice_is_a_one_line_error(update_run):
    path, _t, _d = update_run
    r = run_cli("report", path, path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "same recording" in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_clock_offset_falls_back_to_the_wall_clock_when_the_tsc_was_reset():
    a = [{"monotonic_ns": 1_000, "realtime_ns": 10**18, "tsc": 10**12},
         {"monotonic_ns": 2 * 10**9, "realtime_ns": 10**18 + 2 * 10**9 - 1000, "tsc": 10**12 + 6 * 10**9}]
    first = {"boot_id": "a", "anchors": a, "base_monotonic_ns": 0, "base_realtime_ns": 10**18}
    # new boot 30 s later by the wall clock, monotonic restarted, TSC restarted near zero (a reset, not a kexec)
    b = [{"monotonic_ns": 5 * 10**9, "realtime_ns": 10**18 + 30 * 10**9, "tsc": 15 * 10**9},
         {"monotonic_ns": 6 * 10**9, "realtime_ns": 10**18 + 31 * 10**9, "tsc": 18 * 10**9}]
    later = {"boot_id": "b", "anchors": b, "base_monotonic_ns": 0, "base_realtime_ns": 10**18 + 25 * 10**9}
    off, how = clock.offset(first, later)
    # wall-clock distance of the two last anchors minus their monotonic distance
    assert how == "realtime" and off == (31 * 10**9 - (2 * 10**9 - 1000)) - (6 * 10**9 - 2 * 10**9)
    assert clock.offset(first, dict(first)) == (0, "same boot")
    no_anchors = {"boot_id": "c", "base_monotonic_ns": 7, "base_realtime_ns": 10**18 + 100}
    assert clock.offset(first, no_anchors) == (100 - 7, "realtime")


def test_timeline_across_the_fake_reboot_shows_the_kexec_and_each_blackout(update_run, tmp_path):
    path, truth, d = update_run
    old, new = str(d / "old2.luo"), str(d / "new2.luo")
    _split_at_new_kernel(path, old, new, 3 * 10**9)
    out = tmp_path / "update.json"
    run_cli("timeline", old, new, "-o", str(out), check=True)
    ev = json.loads(out.read_text())["traceEvents"]
    kexec = [e for e in ev if e.get("cat") == "kexec"]
    boots = [e for e in ev if e.get("cat") == "boot"]
    assert len(kexec) == 1 and len(boots) == 2
    blackouts = [e for e in ev if e.get("cat") == "blackout"]
    kept = [t for t in truth["files"] if t["outcome"] == "kexec"]
    assert len(blackouts) == len(kept)
    names = {e["args"]["name"]: (e["pid"], e["tid"]) for e in ev if e.get("name") == "thread_name"}
    for t in kept:
        pid, tid = names[f"{'guest_memfd' if t['handler'] == 'guest_memfd' else 'memfd'} inode {t['inode']}"]
        b = next(e for e in blackouts if (e["pid"], e["tid"]) == (pid, tid))
        retrieve = next(e for e in ev if e.get("cat") == "phase" and e["name"] == "retrieve"
                        and (e["pid"], e["tid"]) == (pid, tid))
        assert abs(b["ts"] + b["dur"] - retrieve["ts"]) < 0.01 and b["ts"] > kexec[0]["ts"]


def test_a_freeze_cut_by_the_jump_is_shown_as_such(update_run, tmp_path):
    """The old kernel's recorder may get the start of the LUO freeze and not its end."""
    path, _truth, _d = update_run
    r = rec.read(path)
    ev = r.events
    first_freeze = int(np.flatnonzero(ev["probe"] == catalog.PROBE_IDS["luo_file_freeze"]).min())
    out = str(tmp_path / "cut.luo")
    w = rec.Writer(out, r.header)
    w.add(ev[: first_freeze + 1].tobytes())
    w.flush()
    w._f.close()
    rep = replay(out)
    s = next(x for x in rep["sessions"] if x["blackout_start_ns"] is not None)
    assert s["blackout_ns"] is None
    text = run_cli("report", out).stdout
    assert "freeze started, cut by the jump" in text
