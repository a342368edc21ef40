"""simulate: recordings at any scale in the real format, read by the same
report path."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import run_cli
from tracer.probes import catalog
from tracer.recording import format as rec
from tracer.analysis.replay import replay
from tracer.analysis.simulate import SimSpec, simulate


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


def _stable_sorted(lifecycle: np.ndarray, chunks) -> np.ndarray:
    allev = np.concatenate([lifecycle, *chunks])
    return allev[np.argsort(allev["ts"], kind="stable")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=30), st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=20),
                                                            max_size=6))
def test_streamed_merge_equals_one_stable_sort(life_ts, chunk_gaps):
    """What trace mode writes a chunk at a time is what sorting everything at once gave."""
    from tracer.probes.events import EVENT_DTYPE
    from tracer.analysis.simulate import _merged
    lifecycle = np.zeros(len(life_ts), dtype=EVENT_DTYPE)
    lifecycle["ts"] = sorted(life_ts)
    lifecycle["probe"] = 1
    lifecycle["a0"] = np.arange(len(life_ts))
    chunks, t = [], 0
    for gaps in chunk_gaps:  # each chunk sorted, each after the one before (ties allowed)
        ts = t + np.cumsum(gaps)
        t = int(ts[-1])
        c = np.zeros(len(ts), dtype=EVENT_DTYPE)
        c["ts"], c["probe"], c["a0"] = ts, 2, np.arange(len(ts))
        chunks.append(c)
    got = list(_merged(lifecycle, iter(chunks)))
    got = np.concatenate(got) if got else np.zeros(0, dtype=EVENT_DTYPE)
    assert got.tobytes() == _stable_sorted(lifecycle, chunks).tobytes()


def test_trace_mode_chunks_keep_every_folio_in_time_order(tmp_path, monkeypatch):
    """Chunked below one file's folio count: the per-folio records span chunks
    and files, and stay whole and ordered."""
    import tracer.analysis.simulate as sim
    monkeypatch.setattr(sim, "CHUNK", 1000)
    out = str(tmp_path / "t.luo")
    info = simulate(SimSpec(files=3, size=3 * (10 << 20), mode="trace", sample_every=3), out)
    ev = rec.read(out).events
    assert len(ev) == info["records"]
    assert (np.diff(ev["ts"].astype(np.int64)) >= 0).all()
    folios = ev[ev["probe"] == catalog.PROBE_IDS["kho_preserve_folio"]]
    assert len(folios) == 3 * -(-2560 // 3)
    for ino in np.unique(folios["ino"]):
        assert list(folios[folios["ino"] == ino]["a1"]) == list(range(0, 2560, 3))  # every 3rd index, once
    rep = replay(out)
    assert sum(f["streamed_events"]["kho_preserve_folio"] for f in rep["files"]) == len(folios)


def test_trace_mode_bigger_than_the_disk_is_refused_before_writing(root, tmp_path):
    import subprocess
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(small)], check=True)
    try:
        r = run_cli("simulate", "-o", str(small / "big.luo"), "--size", "1TiB", "--mode", "trace")
        assert r.returncode == 1, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert "about 16.0 GiB (268435" in line and "16.0 MiB free" in line and "--mode folio" in line, line
        assert list(small.iterdir()) == []  # nothing written
        # the same size in folio mode fits: no per-folio records
        run_cli("simulate", "-o", str(small / "f.luo"), "--size", "1TiB", "--files", "64", check=True)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_simulated_header_says_what_a_live_one_says(tmp_path):
    """One header builder (tracer/recording/header.py) for record and
    simulate: a simulation carries the keys a live recording has but its ring
    sizes, says its files are simulated, and validates."""
    from tracer import schemas
    from tracer.recording import format as rec
    from tracer.recording.header import build
    out = str(tmp_path / "s.luo")
    simulate(SimSpec(files=2, size=8 << 20, seed=3), out)
    head = rec.read(out).header
    live_keys = set(build(kernel="k", hostname="h", mode="folio", target="kernel", labels={}, base_ns=1, real_ns=1,
                          clock_source="CLOCK_MONOTONIC", probes=[], gmem={"backing": "standin"}, layout={},
                          sample_every=1, ringbuf_pages=1024, folio_ringbuf_pages=1024))
    assert live_keys - set(head) == {"ringbuf_pages", "folio_ringbuf_pages"}
    assert head["gmem"]["backing"] == "simulated" and head["event_size"] == 64
    assert schemas.problem("header", head) is None
