"""Programs kept loaded between starts (tracer/attach/bpf_cache.py): the second of
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
from tracer.attach.bpf_cache import PIN_ROOT

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


DROPPED = "dropped and compiled afresh"
BPFTOOL_MAP_TYPE = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash"}


def _kept() -> tuple:
    """(pin directory, metadata path, metadata) of the one kept set."""
    from tracer.attach.bpf_cache import META_DIR
    (key,) = os.listdir(PIN_ROOT)
    meta = os.path.join(META_DIR, key + ".json")
    return os.path.join(PIN_ROOT, key), meta, load_json(meta)


def _tampered_then_exact(model, tmp_path, name: str, why: str) -> None:
    err, rep, truth = record(model, tmp_path, name)
    assert KEPT not in err and DROPPED in err and why in err, err
    assert counts(rep) == truth_counts(truth) and not [a for a in rep["anomalies"] if a["code"] in
                                                       ("pass_count_mismatch", "freeze_unbalanced")]
    err, rep, truth = record(model, tmp_path, name + "-after")  # the fresh compile was kept, and is sound
    assert KEPT in err and DROPPED not in err and counts(rep) == truth_counts(truth)


def test_a_map_pin_swapped_for_a_fresh_map_of_its_shape_is_never_adopted(model, gmem, tmp_path):
    record(model, tmp_path, "keep")
    pins, _meta, meta = _kept()
    t = next(t for t in meta["tables"] if t["name"] == "folio_count" or t["type"] in BPFTOOL_MAP_TYPE)
    os.unlink(os.path.join(pins, "m_" + t["name"]))
    subprocess.run(["bpftool", "map", "create", os.path.join(pins, "m_" + t["name"]), "type",
                    BPFTOOL_MAP_TYPE[t["type"]], "key", str(t["key_size"]), "value", str(t["value_size"]),
                    "entries", str(t["max_entries"]), "name", t["name"][:15], "flags", str(t["flags"])], check=True)
    _tampered_then_exact(model, tmp_path, "swapped-map", f"map {t['name']} is not the one kept")


def test_a_program_pin_swapped_for_another_of_the_set_is_never_adopted(model, gmem, tmp_path):
    record(model, tmp_path, "keep")
    pins, _meta, meta = _kept()
    a, b = sorted(meta["funcs"])[:2]
    os.unlink(os.path.join(pins, "f_" + a))
    subprocess.run(["bpftool", "prog", "pin", "id", str(meta["funcs"][b]["id"]), os.path.join(pins, "f_" + a)],
                   check=True)
    _tampered_then_exact(model, tmp_path, "swapped-prog", f"program {a} is not the one kept")


def test_edited_metadata_is_dropped(model, gmem, tmp_path):
    edits = ((lambda m: dict(m, funcs={}, tables=[]), "the pins are not"),
             (lambda m: dict(m, funcs=dict(sorted(m["funcs"].items())[::2])), "the pins are not"),
             (lambda m: dict(m, key="0" * 24), "not this build's"),
             (lambda m: dict(m, tables=[dict(t, leaf='"char"') if t["value_size"] > 1 else t
                                        for t in m["tables"]]), "does not fit"))
    for i, (edit, why) in enumerate(edits):
        record(model, tmp_path, f"keep{i}")
        _pins, path, meta = _kept()
        with open(path, "w") as f:
            json.dump(edit(meta), f)
        err, rep, truth = record(model, tmp_path, f"edited{i}")
        assert KEPT not in err and DROPPED in err and why in err, (why, err)
        assert counts(rep) == truth_counts(truth)


def test_kept_state_is_roots_alone_whatever_the_umask(model, gmem, tmp_path):
    from tracer.attach.bpf_cache import META_DIR
    subprocess.run(["rm", "-rf", PIN_ROOT, META_DIR], check=True)
    old = os.umask(0)
    try:
        record(model, tmp_path, "umask0")
    finally:
        os.umask(old)
    pins, meta, _m = _kept()
    for d in (PIN_ROOT, pins, META_DIR, os.path.dirname(META_DIR)):
        assert os.stat(d).st_mode & 0o777 == 0o700, d
    for f in [meta] + [os.path.join(META_DIR, n) for n in os.listdir(META_DIR)] + \
            [os.path.join(pins, n) for n in os.listdir(pins)]:
        assert os.stat(f).st_mode & 0o077 == 0, f


def test_a_symlink_where_the_metadata_goes_is_refused_not_followed(model, gmem, tmp_path):
    from tracer.attach.bpf_cache import META_DIR
    subprocess.run(["rm", "-rf", META_DIR], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(str(elsewhere), META_DIR)
    try:
        err, rep, truth = record(model, tmp_path, "symlinked")
        assert "symlink" in err and "not kept between starts" in err and counts(rep) == truth_counts(truth)
        assert not os.listdir(elsewhere)
    finally:
        os.unlink(META_DIR)
