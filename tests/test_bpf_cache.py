"""Programs kept loaded between starts (tracer/bpf_cache.py): the second of
two starts with nothing changed compiles nothing, counts exactly what its own
run did (maps emptied, program runs from zero, nothing of the first run's
ring buffer), and leaves nothing attached when it ends; with
LUOTRACE_BPF_CACHE=0 nothing is kept and every start compiles."""
from __future__ import annotations

import json
import os
import signal
import subprocess

from tests.conftest import LUOTRACE, REPO, load_json, run_cli
from tests.test_signals import attached_prog_ids, kept_prog_ids
from tracer.bpf_cache import PIN_ROOT

UPDATE = ["kexec:gmem:1M,memfd:512K", "cancel:gmem:256K"]
KEPT = "programs kept loaded by the last start"


def record(model: str, tmp_path, name: str, env=None):
    """One `record --model` of UPDATE: its stderr, report and the model's truth."""
    out, rep, truth = (str(tmp_path / f"{name}.{x}") for x in ("luo", "json", "truth.json"))
    r = run_cli("record", "--model", model, "-o", out, "--json", "--", model, "--json", truth, *UPDATE,
                env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr
    with open(rep, "w") as f:
        f.write(r.stdout)
    return r.stderr, json.loads(r.stdout), load_json(truth)


def counts(report: dict) -> dict:
    return {f["inode"]: (f["result"], f["folios_preserved"], f["folios_unpreserved"], f["folios_restored"])
            for f in report["files"]}


def truth_counts(truth: dict) -> dict:
    return {t["inode"]: (t["result"], t["folios_preserved"], t["folios_unpreserved"], t["folios_restored"])
            for t in truth["files"]}


def test_a_second_start_reuses_the_programs_and_counts_only_its_own_run(model, gmem, tmp_path):
    err1, rep1, truth1 = record(model, tmp_path, "first")
    err2, rep2, truth2 = record(model, tmp_path, "second")
    assert KEPT not in err1 or KEPT in err2  # (the first may reuse a start of an earlier test)
    assert KEPT in err2, err2
    assert counts(rep1) == truth_counts(truth1) and counts(rep2) == truth_counts(truth2)
    # program runs count from this run's start: the same update runs each uprobe program as often
    # (the page-cache tracepoints also count whatever else on the host touches a page cache)
    runs1 = {k: v["run_cnt"] for k, v in rep1["bpf"]["programs"].items() if not k.startswith("tracepoint__")}
    runs2 = {k: v["run_cnt"] for k, v in rep2["bpf"]["programs"].items() if not k.startswith("tracepoint__")}
    assert runs2 == runs1 and sum(runs2.values()) > 0
    assert rep2["events"]["received"] == rep1["events"]["received"] and rep2["events"]["lost"] == 0
    # kept loaded, attached to nothing: a model run now runs none of them
    kept = kept_prog_ids()
    assert kept and not (attached_prog_ids() & kept)
    before = {p: _run_cnt(p) for p in kept}
    subprocess.run([model, *UPDATE], check=True, capture_output=True)
    assert {p: _run_cnt(p) for p in kept} == before


def test_reuse_off_compiles_every_start_and_keeps_nothing_new(model, gmem, tmp_path):
    before = kept_prog_ids()
    err, rep, truth = record(model, tmp_path, "off", env={"LUOTRACE_BPF_CACHE": "0"})
    assert KEPT not in err and counts(rep) == truth_counts(truth)
    assert kept_prog_ids() <= before


def test_another_build_of_the_programs_replaces_the_kept_one(model, gmem, tmp_path):
    record(model, tmp_path, "folio")
    slots = set(os.listdir(PIN_ROOT))
    r = run_cli("record", "--mode", "light", "--model", model, "-o", str(tmp_path / "l.luo"), "--", model, *UPDATE)
    assert r.returncode == 0 and KEPT not in r.stderr, r.stderr
    now = set(os.listdir(PIN_ROOT))
    assert len(now) == 1 and now != slots  # one slot kept: the newest


def _run_cnt(prog_id: int) -> int:
    out = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "-j"], capture_output=True, text=True)
    return json.loads(out.stdout or "{}").get("run_cnt", 0)


def test_a_run_beside_the_one_holding_the_kept_programs_compiles_its_own(model, gmem, tmp_path):
    """Two runs never share maps: the second, while the first holds the kept
    programs, compiles its own, and both count their own update exactly."""
    record(model, tmp_path, "keep")  # the kept set now matches these options
    first = subprocess.Popen(LUOTRACE + ["record", "--model", model, "-o", str(tmp_path / "holder.luo"), "--json",
                                         "--duration", "120"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        err = ""
        while "luotrace: tracing" not in (line := first.stderr.readline()):
            assert line, "the first run ended: " + first.stderr.read()
        err += line
        assert KEPT in err
        err2, rep2, truth2 = record(model, tmp_path, "beside")
        assert KEPT not in err2 and counts(rep2) == truth_counts(truth2)
    finally:
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=60)
    # the first saw the second's update too (both watch the model): each file, counted once
    rep1 = json.loads(out)
    assert counts(rep1) == truth_counts(truth2)
