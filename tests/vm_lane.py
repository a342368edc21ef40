"""Host-side checks of `make vmtest` (not part of `make test`): luotrace ran
inside a VM booted on a real Linux 7.2 LUO kernel; its results are files in
LUOTRACE_VM_OUT."""
from __future__ import annotations

import json
import os

import pytest

OUT = os.environ.get("LUOTRACE_VM_OUT", "/tmp/luotrace-vmtest")


def load(name):
    path = os.path.join(OUT, name)
    if not os.path.exists(path) or not os.path.getsize(path):
        log = open(os.path.join(OUT, "log.txt")).read() if os.path.exists(os.path.join(OUT, "log.txt")) else ""
        pytest.fail(f"{name} missing from the VM run; guest log:\n{log[-3000:]}")
    with open(path) as f:
        return json.load(f)


def test_booted_a_luo_kernel():
    info = load("info.json")
    assert info["kernel"].startswith("7.2") and info["liveupdate"] and info["btf"]


@pytest.mark.parametrize("tag", ["light", "folio", "folio-kprobe"])
def test_real_attach_on_real_symbols(tag):
    rep = load(f"report-{tag}.json")
    strat = {p["symbol"]: (p["strategy"], p["status"]) for p in rep["probes"]}
    allowed = {"kprobe"} if tag.endswith("kprobe") else {"kprobe", "fentry"}
    for sym in ("memfd_luo_preserve", "luo_preserve_file") + (("kho_preserve_folio",) if tag != "light" else ()):
        assert strat[sym][1] == "attached" and strat[sym][0] in allowed, (sym, strat[sym])


@pytest.mark.parametrize("mode", ["light", "folio", "folio-kprobe"])
def test_memfds_preserved_with_holes_filled(mode):
    rep, truth = load(f"report-{mode}.json"), load(f"truth-{mode}.json")
    files = {f["inode"]: f for f in rep["files"]}
    for t in truth["files"]:
        f = files[t["inode"]]
        assert f["handler"] == "memfd"
        if t["outcome"] == "cancel":
            assert any(p["name"] == "unpreserve" for p in f["phases"])
            if mode != "light":
                assert f["folios_unpreserved"] == f["folios_preserved"] == t["pages"]
        elif mode != "light" or f["folios_preserved"] is not None:
            assert f["folios_preserved"] == t["pages"]
        assert f["anomalies"] == []


def test_error_cases_show_errno_and_no_preservation():
    rep, truth = load("report-folio.json"), load("truth-folio.json")
    assert truth["errors"] and all(e["errno"] for e in truth["errors"])
    files = {f["inode"]: f for f in rep["files"]}
    for e in truth["errors"]:
        f = files[e["inode"]]
        assert f["errno"] == e["errno"] and f["result"] in ("rejected", "error")
        assert f["folios_preserved"] == 0 and f["preserve"] is None


def test_kho_metadata_pages_are_not_counted_as_file_folios():
    rep = load("report-folio.json")
    for f in rep["files"]:
        if f["preserve"]:
            assert f["metadata_folios"] >= 1  # kho_alloc_preserve's own page, counted apart


def test_luo_selftest_passes_with_and_without_luotrace():
    res = load("selftests.json")
    assert res["untraced_rc"] == 0 and res["traced_rc"] == 0


def test_bpftrace_counts_the_same_kho_preserve_folio_calls():
    rep, bt = load("report-sbs.json"), load("bpftrace.json")
    ours = sum(f["folios_preserved"] + f["metadata_folios"] for f in rep["files"] if f["preserve"])
    assert bt["folios"] == ours, bt["output"]


def test_vmbench_ran():
    res = load("vmbench.json")
    base = sorted(res["untraced"] + res["untraced2"])[len(res["untraced"])]
    for mode in ("light", "folio"):
        med = sorted(res[mode])[len(res[mode]) // 2]
        print(f"vmbench 256 MiB memfd preserve: {mode} ratio {med / base:.3f} (baseline {base / 1e6:.1f} ms)")
        assert med > 0
