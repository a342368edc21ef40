"""simulate: recordings at any scale in the real format, read by the same
report path."""
from __future__ import annotations

import numpy as np

from tests.conftest import run_cli
from tracer import catalog
from tracer import recording as rec
from tracer.replay import replay
from tracer.simulate import SimSpec, simulate


def test_one_tebibyte_over_64_files(tmp_path):
    out = str(tmp_path / "big.luo")
    simulate(SimSpec(files=64, size=1 << 40, mode="folio"), out)
    rep = replay(out)
    assert rep["totals"]["folios_preserved"] == 268_435_456
    assert len(rep["files"]) == 64 and all(f["result"] == "retrieved" for f in rep["files"])
    f = rep["files"][0]
    assert sum(f["folio_latency_log2_ns"].values()) == f["folios_preserved"] == (1 << 40) // 64 // 4096
    assert rep["anomalies"] == []


def test_injected_errors_and_anomalies_are_reported(tmp_path):
    out = str(tmp_path / "bad.luo")
    simulate(SimSpec(files=6, size=6 << 20, errors=1, anomalies=["holes", "pass_count_mismatch", "pfn_zero",
                                                                  "large_folios", "folio_added_while_frozen"]), out)
    rep = replay(out)
    codes = sorted(a["code"] for a in rep["anomalies"])
    assert codes == ["folio_added_while_frozen", "holes", "large_folios", "pass_count_mismatch", "pfn_zero"]
    assert [f["errno"] for f in rep["files"]].count("EHWPOISON") == 1


def test_trace_mode_streams_per_folio_records(tmp_path):
    out = str(tmp_path / "t.luo")
    simulate(SimSpec(files=2, size=8 << 20, mode="trace", lost=5), out)
    r = rec.read(out)
    per_folio = int(np.count_nonzero(r.events["probe"] == catalog.PROBE_IDS["kho_preserve_folio"]))
    assert per_folio == 2048
    rep = replay(out)
    assert rep["events"]["lost"] == 5
    assert sum(f["streamed_events"]["kho_preserve_folio"] for f in rep["files"]) == 2048


def test_cli_simulate_and_bad_input(tmp_path):
    out = str(tmp_path / "s.luo")
    r = run_cli("simulate", "-o", out, "--files", "3", "--size", "12M", check=True)
    assert "simulated 3 files" in r.stderr
    assert "guest_memfd" in run_cli("report", out, check=True).stdout
    r = run_cli("simulate", "-o", out, "--size", "lots")
    assert r.returncode != 0 and "bad size" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("simulate", "-o", out, "--slow", "fill_pass")
    assert r.returncode != 0 and "--slow" in r.stderr
