"""One catalog for every revision of the guest_memfd series: the reference
model built as the later revisions have it (luo_model-latest: no freeze op,
preserve takes the VM token itself) is traced by the same catalog, agrees
with its ground truth, and doctor names the revision instead of failing it."""
from __future__ import annotations

import os

import pytest

from tests.conftest import MODEL, run_cli
from tracer.probes import catalog
from tracer.live.model import compare, run_model

LATEST = MODEL + "-latest"
SESSIONS = ["kexec:gmem:1M,memfd:256K", "cancel:gmem:512K", "keep:gmem:512K:token_enoent",
            "keep:gmem:512K:hwpoison=20"]


def test_revision_of_tells_them_apart():
    present = {p.name for p in catalog.PROBES}
    assert catalog.revision_of("guest_memfd", present).name == "seed"
    assert catalog.revision_of("guest_memfd", present - {"gmem_luo_freeze"}).name == "latest"
    assert catalog.DROPPED_BY == {"gmem_luo_freeze": ("latest",)}


@pytest.fixture(scope="module")
def latest(model, gmem, tmp_path_factory):
    assert os.path.exists(LATEST), "make model builds it"
    out = str(tmp_path_factory.mktemp("latest") / "latest.luo")
    return run_model("folio", SESSIONS, out, model=LATEST, progress=lambda s: None)


def test_the_latest_revision_is_traced_and_agrees_with_the_model(latest):
    res, truth = latest
    assert compare(res.report, truth) == []
    st = {p["name"]: p for p in res.report["probes"]}
    assert st["gmem_luo_freeze"]["status"] == "absent" and "latest revision" in st["gmem_luo_freeze"]["reason"]
    gm = [f for f in res.report["files"] if f["handler"] == "guest_memfd"]
    kept, cancelled, enoent, poisoned = gm
    # no freeze op: no luo_freeze phase; the token is taken inside preserve
    assert not any(p["name"] == "luo_freeze" for f in gm for p in f["phases"])
    assert kept["result"] == "retrieved" and kept["vm_token_in"] == "preserve" and kept["vm_token"]
    assert enoent["result"] == "error" and enoent["errno"] == "ENOENT" and enoent["failed_phase"] == "preserve"
    assert enoent["vm_token_in"] == "preserve" and enoent["vm_token_errno"] == "ENOENT"
    assert enoent["folios_preserved"] == 0 and not any(p["name"] == "count_pass" for p in enoent["phases"])
    assert enoent["anomalies"] == []  # failed before its walk: no holes judged from its teardown
    assert poisoned["errno"] == "EHWPOISON" and poisoned["folios_preserved"] == 20
    # its unwind hands no folio array back: what it gave back is unknown by default, and said
    assert poisoned["folios_unpreserved"] is None and "unwind_incomplete" in poisoned["anomalies_not_checked"]
    memfd = next(f for f in res.report["files"] if f["handler"] == "memfd")
    assert any(p["name"] == "luo_freeze" for p in memfd["phases"])  # memfd keeps its freeze op


def test_the_seed_takes_its_token_in_the_freeze_op(model, gmem, tmp_path):
    res, truth = run_model("light", ["kexec:gmem:256K", "kexec:gmem:256K:token_enoent"], str(tmp_path / "s.luo"),
                           model=model, progress=lambda s: None)
    ok, enoent = res.report["files"]
    assert ok["vm_token_in"] == "luo_freeze" and ok["vm_token"]
    assert enoent["failed_phase"] == "luo_freeze" and enoent["vm_token_errno"] == "ENOENT"


def test_doctor_names_the_revision_and_fails_nothing_for_a_dropped_op(model, gmem):
    r = run_cli("doctor", "--model", LATEST)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "model: guest_memfd revision" in ln)
    assert line.startswith("ok   ") and "absent: luo_freeze" in line and "looks like revision latest" in line
    assert "FAIL" not in r.stdout
    r = run_cli("doctor", "--model", model)
    assert "looks like revision seed" in r.stdout


def test_no_metric_series_for_an_op_the_revision_dropped(latest):
    from exporters.prometheus import families
    res, _truth = latest
    fam = next(f for f in families(res.report) if f.name == "luotrace_phase_duration_seconds")
    phases = {(s.labels["handler"], s.labels["phase"]) for s in fam.samples}
    assert ("guest_memfd", "luo_freeze") not in phases and ("memfd", "luo_freeze") in phases
    assert ("guest_memfd", "retrieve") in phases
