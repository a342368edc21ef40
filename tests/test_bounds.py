"""Bounded maps: when a per-file map is full the tracer drops updates, counts
them in BPF, and the report says so (the traced run is never disturbed)."""
from __future__ import annotations

import json

from tracer.loader import Options
from tracer.session import run

from .conftest import MODEL, load_json


def test_full_per_file_map_is_counted_and_shown(model, kvm, tmp_path):
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


def test_a_frozen_guest_memfd_filled_late_is_counted_whole_and_kept_bounded(model, kvm, tmp_path):
    """2048 folios added to a frozen guest_memfd (the real tracepoint, the real
    inode): the anomaly counts all of them, the evidence kept is bounded."""
    from tracer.aggregator import EVIDENCE_MAX
    from tracer.loader import Options
    from tracer.session import run
    truth_path = str(tmp_path / "t.json")
    res = run(Options(mode="folio", model=MODEL), str(tmp_path / "late.luo"),
              command=[MODEL, "--json", truth_path, "keep:gmem:16M:late_fallocate=2048"], progress=lambda s: None)
    t = load_json(truth_path)["files"][0]
    f = next(x for x in res.report["files"] if x["inode"] == t["inode"])
    (a,) = f["anomalies"]
    assert a["code"] == "folio_added_while_frozen"
    assert a["detail"].startswith("2048 folio(s) added") and "first at index 2048 " in a["detail"]
    assert f["folios_populated"] == t["folios_populated"] == 4096 + 2048
    assert res.report["events"]["lost"] == 0
    from tracer import recording as rec
    from tracer.aggregator import Aggregator
    r = rec.read(str(tmp_path / "late.luo"))
    agg = Aggregator("folio")
    for batch in r.batches():
        agg.feed(batch)
    st = next(s for k, s in agg.files.items() if k[2] == t["inode"])
    assert st.frozen_adds == 2048 and len(st.frozen_changes) == EVIDENCE_MAX < 2048
