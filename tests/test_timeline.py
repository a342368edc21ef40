"""timeline: the Perfetto/Chrome trace of a real demo run, parsed back."""
from __future__ import annotations

import json


from tests.conftest import run_cli
from tracer.demo import DEFAULT_SESSIONS, run_model
from tracer.simulate import SimSpec, simulate

ORDER = ["can_preserve", "preserve", "count_pass", "fill_pass", "preserve_folios", "vmalloc", "luo_freeze",
         "unpreserve", "retrieve", "finish"]


def load(path):
    with open(path) as f:
        return json.load(f)


def test_demo_timeline_one_track_per_file_phases_in_order(model, kvm, tmp_path):
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
