"""Bounded maps: when a per-file map is full the tracer drops updates, counts
them in BPF, and the report says so (the traced run is never disturbed)."""
from __future__ import annotations

import json

from tracer.loader import Options
from tracer.session import run


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
