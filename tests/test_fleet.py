"""The fleet dataset: real recordings (the reference model traced live) and
simulated ones of several hosts exported to Parquet, checked against their
reports; appended twice, damaged, cut short, interrupted; then queried by
DuckDB (`luotrace fleet`), whose answers are computed again here from the
reports themselves.  Spark's answers are in test_fleet_spark.py."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from tracer import schemas
from tracer.fleet import dataset
from tracer.fleet import query as fleet
from tracer.fleet import schema as fs
from tracer.recording import format as rec
from tracer.live.model import run_model
from tracer.base.errors import LuotraceError
from tracer.analysis.replay import replay
from tracer.analysis.simulate import SimSpec, simulate

DAY = 86400 * 10 ** 9
T0 = 1_796_000_000 * 10 ** 9  # 2026-11-30 00:53 UTC


def _sim(d, name: str, host: str, patch: str, seed: int, **kw) -> str:
    path = str(d / f"{name}.luo")
    simulate(SimSpec(files=3, size=24 << 20, seed=seed, labels={"patch": patch}, hostname=host,
                     kernel=kw.pop("kernel", "7.2.13-luo"), started_ns=T0 + seed * DAY // 4, **kw),
             path, progress=lambda s: None)
    return path


@pytest.fixture(scope="module")
def recordings(model, gmem, tmp_path_factory):
    """Two live model runs (patch=live) and eight simulated updates over
    four hosts and two patch revisions, one with a failure and anomalies."""
    d = tmp_path_factory.mktemp("fleetrec")
    live = []
    for i, sessions in enumerate((["kexec:gmem:512K,memfd:256K"], ["kexec:gmem:1M", "cancel:memfd:256K"])):
        p = str(d / f"live{i}.luo")
        run_model("folio", sessions, p, model=model, progress=lambda s: None, labels={"patch": "live"})
        live.append(p)
    sim = [_sim(d, f"sim{i}", f"host{i % 4}", "v3" if i < 4 else "v4", seed=i,
                **({"errors": 1, "anomalies": ["holes"]} if i == 6 else {})) for i in range(8)]
    return live, sim


@pytest.fixture
def ds(recordings, tmp_path):
    live, sim = recordings
    root = str(tmp_path / "ds")
    res = dataset.export(root, live + sim)
    assert res.added == len(live + sim) and res.skipped == 0 and not res.warnings, res
    return root


def _table(root: str, t: str) -> list:
    return fleet.sql_records(root, f"SELECT * FROM {t}")


def test_rows_match_the_reports(recordings, ds):
    live, sim = recordings
    reports = {dataset.recording_id(rec.read(p).header): replay(p) for p in live + sim}
    updates = {u["recording_id"]: u for u in _table(ds, "updates")}
    assert set(updates) == set(reports)
    files = _table(ds, "files")
    phases = _table(ds, "phases")
    for rid, rep in reports.items():
        u = updates[rid]
        assert u["host"] == rep["recording"]["hostname"] and u["schema"] == fs.VERSION
        assert u["files"] == rep["totals"]["files"] and u["folios_preserved"] == rep["totals"]["folios_preserved"]
        assert u["bytes_preserved"] == rep["totals"]["bytes_preserved"]
        assert u["anomalies"] == len(rep["anomalies"]) and u["events_received"] == rep["events"]["received"]
        assert dict(u["labels"]) == rep["recording"]["labels"]
        assert u["kernel"] == fs.partition_value(rep["recording"]["kernel"]) and u["kernel_release"] == rep["recording"]["kernel"]
        mine = sorted((f["handler"], f["inode"], f["folios_preserved"], f["result"], f["errno"], f["preserve_ns"])
                      for f in files if f["recording_id"] == rid)
        theirs = sorted((f["handler"], f["inode"], f["folios_preserved"], f["result"], f["errno"],
                         sum(p["duration_ns"] for p in f["phases"] if p["name"] == "preserve") or None)
                        for f in rep["files"])
        assert mine == theirs
        assert sorted((p["inode"], p["phase"], p["start_ns"], p["duration_ns"]) for p in phases if p["recording_id"] == rid) \
            == sorted((f["inode"], p["name"], p["start_ns"], p["duration_ns"]) for f in rep["files"] for p in f["phases"])
    # the live runs preserved real folios on both handlers, and the dataset says so
    live_ids = {dataset.recording_id(rec.read(p).header) for p in live}
    handlers = {f["handler"] for f in files if f["recording_id"] in live_ids and f["folios_preserved"]}
    assert handlers == {"guest_memfd", "memfd"}
    # integers stay integers in the files themselves
    t = pq.read_table(next(fs.parts(ds, "files")))
    assert str(t.schema.field("folios_preserved").type) == "int64" and str(t.schema.field("preserve_ns").type) == "int64"
    assert str(pq.read_table(next(fs.parts(ds, "updates"))).schema.field("labels").type).startswith("map<string, string")


def test_the_same_recordings_twice_add_nothing(recordings, ds):
    live, sim = recordings
    before = {t: len(_table(ds, t)) for t in fs.TABLES}
    res = dataset.export(ds, sim + live)
    assert (res.added, res.already, res.parts) == (0, len(sim + live), 0)
    assert {t: len(_table(ds, t)) for t in fs.TABLES} == before
    # a copy elsewhere is the same recording
    copy = os.path.join(os.path.dirname(ds), "copy.luo")
    shutil.copy(sim[0], copy)
    assert dataset.export(ds, [copy]).already == 1


def test_damaged_and_truncated_recordings_add_their_sound_parts(recordings, tmp_path):
    _live, sim = recordings
    data = bytearray(open(sim[1], "rb").read())
    _k, _pos, start, _length = [c for c in rec.walk(bytes(data)) if c[0] == rec.CH_EVENTS][0]
    data[start + 8] ^= 0x10
    damaged = tmp_path / "damaged.luo"
    damaged.write_bytes(bytes(data))
    cut = tmp_path / "cut.luo"
    whole = open(sim[2], "rb").read()
    cut.write_bytes(whole[: len(whole) - 40])
    garbage = tmp_path / "garbage.luo"
    garbage.write_bytes(b"not a recording at all")
    root = str(tmp_path / "ds")
    r = run_cli("export", "--parquet", root, str(damaged), str(cut), str(garbage))
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warn) == 3 and "Traceback" not in r.stderr, r.stderr
    assert any("damaged part(s) skipped" in w for w in warn) and any("garbage.luo: skipped" in w for w in warn)
    assert "2 recording(s) added" in r.stderr and "1 unreadable" in r.stderr
    ups = {u["damaged_parts"]: u for u in _table(root, "updates")}
    assert set(ups) == {0, 1} and ups[0]["truncated"] and not ups[1]["truncated"]
    assert ups[1]["damaged_records"] > 0
    # only unreadable input: a one-line error exit
    r = run_cli("export", "--parquet", str(tmp_path / "ds2"), str(garbage))
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_one_export_at_a_time(recordings, tmp_path):
    _live, sim = recordings
    root = tmp_path / "ds"
    (root / fs.META).mkdir(parents=True)
    with dataset._Lock(str(root)):
        with pytest.raises(LuotraceError, match="another export"):
            dataset.export(str(root), sim[:1])


def _expected(reports, key):
    """The summary computed from the reports, with numpy's percentiles."""
    groups: dict = {}
    for rep in reports:
        g = groups.setdefault(key(rep), {"updates": 0, "hosts": set(), "files": 0, "errors": {}, "anomalies": {},
                                         "phases": {}})
        g["updates"] += 1
        g["hosts"].add(rep["recording"]["hostname"])
        g["files"] += rep["totals"]["files"]
        for f in rep["files"]:
            if f.get("errno"):
                k = (f["handler"], f["errno"], f["failed_phase"])
                g["errors"][k] = g["errors"].get(k, 0) + 1
            for p in f["phases"]:
                g["phases"].setdefault((f["handler"], p["name"]), []).append(p["duration_ns"])
        for a in rep["anomalies"]:
            g["anomalies"][a["code"]] = g["anomalies"].get(a["code"], 0) + 1
    return groups


@pytest.mark.parametrize("by", ["patch", "host", "kernel"])
def test_duckdb_summary_equals_the_reports(recordings, ds, by):
    live, sim = recordings
    reports = [replay(p) for p in live + sim]
    key = {"patch": lambda r: r["recording"]["labels"]["patch"], "host": lambda r: r["recording"]["hostname"],
           "kernel": lambda r: r["recording"]["kernel"]}[by]
    want = _expected(reports, key)
    got = fleet.summary(ds, by)
    assert [g["grp"] for g in got["groups"]] == sorted(want)
    for g in got["groups"]:
        w = want[g["grp"]]
        assert (g["updates"], g["hosts"], g["files"]) == (w["updates"], len(w["hosts"]), w["files"])
        assert g["files_error"] == sum(w["errors"].values())
    assert {(e["grp"], e["handler"], e["errno"], e["failed_phase"]): e["files"] for e in got["errors"]} == \
        {(g, *k): n for g, w in want.items() for k, n in w["errors"].items()}
    assert {(a["grp"], a["code"]): a["anomalies"] for a in got["anomalies"]} == \
        {(g, c): n for g, w in want.items() for c, n in w["anomalies"].items()}
    phases = {(p["grp"], p["handler"], p["phase"]): p for p in got["phases"]}
    assert set(phases) == {(g, *k) for g, w in want.items() for k in w["phases"]}
    for (g, h, ph), p in phases.items():
        xs = want[g]["phases"][(h, ph)]
        assert p["n"] == len(xs)
        assert p["p50_ns"] == pytest.approx(float(np.percentile(xs, 50)), rel=1e-9)
        assert p["p99_ns"] == pytest.approx(float(np.percentile(xs, 99)), rel=1e-9)
    if by == "patch":
        assert {a["grp"] for a in got["anomalies"]} == {"v4"} and {e["grp"] for e in got["errors"]} == {"v4"}


def test_fleet_commands(recordings, ds):
    r = run_cli("fleet", ds, "--by", "patch", check=True)
    assert "patch=live" in r.stdout and "patch=v4" in r.stdout and "EHWPOISON in preserve x1" in r.stdout
    j = json.loads(run_cli("fleet", ds, "--json", check=True).stdout)
    assert sum(g["updates"] for g in j["groups"]) == 10
    r = run_cli("fleet", "sql", ds, "SELECT count(*) AS n FROM files f JOIN updates u USING (recording_id) "
                "WHERE u.labels['patch'] = 'v4'", "--json", check=True)
    assert json.loads(r.stdout) == {"columns": ["n"], "rows": [[12]]}
    r = run_cli("fleet", "compare", ds, "--by", "patch", "v3", "v4", "--json", check=True)
    res = json.loads(r.stdout)
    assert schemas.problem("compare", res) is None
    assert res["a"].startswith("patch=v3 (4 updates)") and {row["phase"] for row in res["phases"]} >= {"fill_pass"}
    for argv, what in ((["fleet", ds, "--by", "a b"], "bad --by"), (["fleet", "sql", ds, "SELEC 1"], "query failed"),
                       (["fleet", "compare", ds, "--by", "patch", "v3", "v9"], "no update has patch=v9"),
                       (["fleet", "/nonexistent"], "holds no fleet dataset"),
                       (["export", recordings[1][0]], "exactly one of --textfile")):
        r = run_cli(*argv)
        assert r.returncode != 0 and what in r.stderr and r.stderr.count("\n") == 1, (argv, r.stderr)


def test_fleet_compare_finds_a_slowed_phase(tmp_path):
    """Twelve updates a side; v4's fill pass 30 % slower: found, and nothing else."""
    paths = [_sim(tmp_path, f"s{i}", f"h{i % 6}", "v3" if i % 2 else "v4", seed=100 + i,
                  phase_scale={"fill_pass": 1.3} if i % 2 == 0 else {}) for i in range(24)]
    root = str(tmp_path / "ds")
    dataset.export(root, paths)
    from tracer.analysis.compare import compare
    a, b = fleet.compare_sides(root, "patch", "v3", "v4")
    res = compare(a, b)
    assert res["changed"] == ["guest_memfd/fill_pass"], res["changed"]
    # the sample cap: a side with more calls than the cap says so
    a, b = fleet.compare_sides(root, "patch", "v3", "v4", cap=10)
    assert a.sampled_from[("guest_memfd", "fill_pass")] == 36 and len(a.samples[("guest_memfd", "fill_pass")]) == 10
