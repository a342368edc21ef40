"""timeline: the Perfetto/Chrome trace of a real demo run, parsed back."""
from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import run_cli
from tracer.live.model import DEFAULT_SESSIONS, run_model
from tracer.analysis.simulate import SimSpec, simulate

ORDER = ["can_preserve", "preserve", "count_pass", "fill_pass", "preserve_folios", "vmalloc", "luo_freeze",
         "unpreserve", "retrieve", "finish"]


def load(path):
    with open(path) as f:
        return json.load(f)


def test_demo_timeline_one_track_per_file_phases_in_order(model, gmem, tmp_path):
    out = str(tmp_path / "demo.luo")
    res, truth = run_model("folio", DEFAULT_SESSIONS + ["keep:gmem:1M:pass_mismatch"], out, model=model,
                           progress=lambda s: None)
    tl = str(tmp_path / "demo.json")
    run_cli("timeline", out, "-o", tl, check=True)
    ev = load(tl)["traceEvents"]
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    files = [f for f in res.report["files"] if f["result"] != "none"]
    file_tracks = {k: v for k, v in tracks.items() if "inode" in v}
    assert sorted(file_tracks.values()) == sorted(f"{f['handler']} inode {f['inode']}" for f in files)
    for pid, tid in file_tracks:
        slices = sorted((e for e in ev if e.get("ph") == "X" and e["pid"] == pid and e["tid"] == tid),
                        key=lambda e: e["ts"])
        names = [e["name"] for e in slices]
        assert names and names[0] == "can_preserve"
        top = [n for n in names if n not in ("count_pass", "fill_pass", "vmalloc", "preserve_folios")]
        assert [ORDER.index(n) for n in top] == sorted(ORDER.index(n) for n in top), names
    assert any(e["name"].startswith("blackout") and e["ph"] == "X" for e in ev)
    assert any(e.get("cat") == "error" and "EHWPOISON" in e["name"] for e in ev)
    assert any(e.get("cat") == "anomaly" and e["name"] == "pass_count_mismatch" for e in ev)
    assert any(e.get("ph") == "C" for e in ev)


def test_large_trace_is_downsampled(tmp_path):
    out = str(tmp_path / "t.luo")
    simulate(SimSpec(files=2, size=256 << 20, mode="trace"), out)  # 65,536 per-folio records
    tl = str(tmp_path / "t.json")
    run_cli("timeline", out, "-o", tl, check=True)
    doc = load(tl)
    counters = [e for e in doc["traceEvents"] if e.get("ph") == "C"]
    assert 0 < len(counters) <= 2 * 500
    last = max(counters, key=lambda e: e["ts"])
    assert list(last["args"].values())[0] == 32768  # the cumulative count reaches every folio


def test_single_recording_draws_its_kexec_and_puts_instants_at_their_evidence(model, gmem, tmp_path):
    """One recording of an update: the kexec is on the live-update track; an
    anomaly's instant sits at its first evidence (holes: the end of the count
    pass), an error's at the end of the phase that failed; --events decodes
    a can_preserve verdict as a bool."""
    out = str(tmp_path / "k.luo")
    res, _truth = run_model("folio", ["kexec:gmem:1M,memfd:256K", "keep:gmem:1M:holes=3",
                                      "cancel:gmem:1M:hwpoison=10"], out, model=model, progress=lambda s: None)
    rep = res.report
    assert len(rep["kexec_ns"]) == 1
    tl = str(tmp_path / "k.json")
    run_cli("timeline", out, "-o", tl, check=True)
    ev = load(tl)["traceEvents"]
    (kx,) = [e for e in ev if e.get("cat") == "kexec"]
    assert kx["ts"] == rep["kexec_ns"][0] / 1e3
    f = next(x for x in rep["files"] if any(a["code"] == "holes" for a in x["anomalies"]))
    hole = next(a for a in f["anomalies"] if a["code"] == "holes")
    cp = next(p for p in f["phases"] if p["name"] == "count_pass")
    assert hole["time_ns"] == cp["start_ns"] + cp["duration_ns"] and hole["count"] == 3
    (inst,) = [e for e in ev if e.get("cat") == "anomaly" and e["name"] == "holes"]
    assert inst["ts"] == hole["time_ns"] / 1e3 and inst["args"]["count"] == 3
    bad = next(x for x in rep["files"] if x["errno"])
    failed = next(p for p in bad["phases"] if p["name"] == bad["failed_phase"] and p.get("errno"))
    (err,) = [e for e in ev if e.get("cat") == "error"]
    assert err["ts"] == (failed["start_ns"] + failed["duration_ns"]) / 1e3
    lines = [json.loads(x) for x in run_cli("report", "--events", out, check=True).stdout.splitlines()]
    verdicts = [x["ret"] for x in lines if x["probe"].endswith("can_preserve") and x["kind"] == "return"]
    assert verdicts and all(isinstance(v, bool) for v in verdicts) and True in verdicts


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 10**6)), min_size=1, max_size=400),
       st.integers(1, 50), st.integers(1, 7))
def test_folio_progress_in_batches_equals_binning_everything_at_once(rows, batch, max_points):
    """The streamed two-pass binning (bounded memory) gives the counter the
    timeline drew from all of a file's sorted timestamps at once."""
    from tracer.probes import catalog
    from tracer.probes.events import EVENT_DTYPE
    from tracer.analysis.folio_progress import FolioProgress
    e = np.zeros(len(rows) + 5, dtype=EVENT_DTYPE)
    e["probe"] = catalog.PROBE_IDS["kho_preserve_folio"]
    e["ino"][:len(rows)] = [r[0] for r in rows]
    e["ts"][:len(rows)] = [r[1] for r in rows]
    e["probe"][len(rows):] = catalog.PROBE_IDS["gmem_preserve"]  # other records are not folios
    batches = [e[i:i + batch] for i in range(0, len(e), batch)]
    fp = FolioProgress(max_points)
    for b in batches:
        fp.scan(b)
    for b in batches:
        fp.count(b)
    for ino in set(r[0] for r in rows):
        ts = np.sort(np.array([r[1] for r in rows if r[0] == ino], dtype=np.uint64))
        edges = np.linspace(float(ts[0]), float(ts[-1]) + 1, min(max_points, len(ts)) + 1)
        want = np.searchsorted(ts.astype(np.float64), edges[1:], side="left")
        ends, cum = fp.series(ino)
        assert list(ends) == list(edges[1:]) and list(cum) == list(want)
        assert cum[-1] == len(ts)
    assert len(fp.series(99)[0]) == 0
