"""Bounded maps: when a per-file map is full the tracer drops updates, counts
them in BPF, and the report says so (the traced run is never disturbed)."""
from __future__ import annotations

import json

from tracer.probes.plan import Options
from tracer.live.runner import run

from .conftest import MODEL, load_json


def test_full_per_file_map_is_counted_and_shown(model, gmem, tmp_path):
    truth_path = str(tmp_path / "t.json")
    res = run(Options(mode="folio", model=model, max_files=2), str(tmp_path / "b.luo"),
              command=[model, "--json", truth_path, "keep:gmem:256K,gmem:256K,gmem:256K,gmem:256K"],
              progress=lambda s: None)
    assert json.load(open(truth_path))["files"][3]["result"] == "ok"  # the run itself was not harmed
    ev = res.report["events"]
    assert ev["map_full"] > 0
    assert [f["result"] for f in res.report["files"]] == ["ok"] * 4  # lifecycle is not map-bound
    from exporters.text import render
    assert "map full" in render(res.report)


def test_a_frozen_guest_memfd_filled_late_is_counted_whole_and_kept_bounded(model, gmem, tmp_path):
    """2048 folios added to a frozen guest_memfd (the real tracepoint, the real
    inode): the anomaly counts all of them, the evidence kept is bounded."""
    from tracer.analysis.aggregator import EVIDENCE_MAX
    from tracer.probes.plan import Options
    from tracer.live.runner import run
    truth_path = str(tmp_path / "t.json")
    res = run(Options(mode="folio", model=MODEL), str(tmp_path / "late.luo"),
              command=[MODEL, "--json", truth_path, "keep:gmem:16M:late_fallocate=2048"], progress=lambda s: None)
    t = load_json(truth_path)["files"][0]
    f = next(x for x in res.report["files"] if x["inode"] == t["inode"])
    (a,) = f["anomalies"]
    assert a["code"] == "folio_added_while_frozen"
    assert a["detail"].startswith("2048 folio(s) added") and "first at index 2048 " in a["detail"]
    # the same evidence as fields: what, how many, where, when (after the freeze, inside the file's life)
    assert a["count"] == 2048 and a["first_index"] == 2048 and a["pfn"] > 0
    freeze_end = next(p["start_ns"] + p["duration_ns"] for p in f["phases"] if p["name"] == "fill_pass")
    assert freeze_end < a["time_ns"] < res.report["duration_ns"]
    assert {"handler": "guest_memfd", "inode": t["inode"], **a} in res.report["anomalies"]
    assert f["folios_populated"] == t["folios_populated"] == 4096 + 2048
    assert res.report["events"]["lost"] == 0
    from tracer.recording import format as rec
    from tracer.analysis.aggregator import Aggregator
    r = rec.read(str(tmp_path / "late.luo"))
    agg = Aggregator("folio")
    for batch in r.batches():
        agg.feed(batch)
    st = next(s for k, s in agg.files.items() if k[2] == t["inode"])
    assert st.frozen_adds == 2048 and len(st.frozen_changes) == EVIDENCE_MAX < 2048


def test_a_recording_claiming_50000_files_is_followed_up_to_the_bound(tmp_path):
    """A crafted recording: one preserve call each for 50,000 distinct inodes.
    The first FILES_MAX files are followed, the rest counted and reported;
    what luotrace holds is bounded by FILES_MAX, not by the file's claims."""
    import numpy as np

    from tests.conftest import run_cli
    from tracer.probes import catalog
    from tracer.recording import format as rec
    from tracer.analysis.aggregator import FILES_MAX
    from tracer.probes.events import EV_ENTRY, EVENT_DTYPE
    n = 50_000
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["ts"] = np.arange(1, n + 1) * 1000
    ev["probe"], ev["kind"] = catalog.PROBE_IDS["gmem_preserve"], EV_ENTRY
    ev["handler"], ev["dev"], ev["ino"] = 1, 16, np.arange(n) + 100
    ev["tid"] = np.arange(n) % 70_000 + 1
    header = {"format": "luotrace.recording", "mode": "light", "clock": {"base_monotonic_ns": 0, "base_realtime_ns": 0}}
    path = tmp_path / "many.luo"
    path.write_bytes(rec.preamble(json.dumps(header).encode()) + rec.frame(rec.CH_EVENTS, ev.tobytes()))
    r = run_cli("report", "--json", str(path), timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert len(rep["files"]) == FILES_MAX
    assert rep["untracked_files"] == n - FILES_MAX and rep["events"]["untracked"] == n - FILES_MAX
    text = run_cli("report", str(path), timeout=600).stdout
    assert f"{n - FILES_MAX} more files were counted, not followed" in text
