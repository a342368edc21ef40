"""Host-side checks of `make vmtest` (not part of `make test`): luotrace ran
inside a VM booted on a real Linux 7.2 LUO kernel; its results are files in
LUOTRACE_VM_OUT."""
from __future__ import annotations

import json
import os

import pytest

OUT = os.environ.get("LUOTRACE_VM_OUT", "/tmp/luotrace-vmtest")
# LUOTRACE_VM_ONLY=kexec make vmtest: only the live updates ran (3 min instead of 14)
single_kernel = pytest.mark.skipif(os.environ.get("LUOTRACE_VM_ONLY") == "kexec",
                                   reason="LUOTRACE_VM_ONLY=kexec: the single-kernel part did not run")


def load(name):
    path = os.path.join(OUT, name)
    if not os.path.exists(path) or not os.path.getsize(path):
        log = open(os.path.join(OUT, "log.txt")).read() if os.path.exists(os.path.join(OUT, "log.txt")) else ""
        pytest.fail(f"{name} missing from the VM run; guest log:\n{log[-3000:]}")
    with open(path) as f:
        return json.load(f)


@single_kernel
def test_booted_a_luo_kernel():
    info = load("info.json")
    assert info["kernel"].startswith("7.2") and info["liveupdate"] and info["btf"]


@single_kernel
@pytest.mark.parametrize("tag", ["light", "folio", "folio-kprobe"])
def test_real_attach_on_real_symbols(tag):
    rep = load(f"report-{tag}.json")
    strat = {p["symbol"]: (p["strategy"], p["status"]) for p in rep["probes"]}
    allowed = {"kprobe"} if tag.endswith("kprobe") else {"kprobe", "fentry"}
    for sym in ("memfd_luo_preserve", "luo_preserve_file") + (("kho_preserve_folio",) if tag != "light" else ()):
        assert strat[sym][1] == "attached" and strat[sym][0] in allowed, (sym, strat[sym])


@single_kernel
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


@single_kernel
def test_error_cases_show_errno_and_no_preservation():
    rep, truth = load("report-folio.json"), load("truth-folio.json")
    assert truth["errors"] and all(e["errno"] for e in truth["errors"])
    files = {f["inode"]: f for f in rep["files"]}
    for e in truth["errors"]:
        f = files[e["inode"]]
        assert f["errno"] == e["errno"] and f["result"] in ("rejected", "error")
        assert f["folios_preserved"] == 0 and f["preserve"] is None


@single_kernel
def test_kho_metadata_pages_are_not_counted_as_file_folios():
    rep = load("report-folio.json")
    for f in rep["files"]:
        if f["preserve"]:
            assert f["metadata_folios"] >= 1  # kho_alloc_preserve's own page, counted apart


@single_kernel
def test_luo_selftest_passes_with_and_without_luotrace():
    res = load("selftests.json")
    assert res["untraced_rc"] == 0 and res["traced_rc"] == 0


@single_kernel
def test_bpftrace_counts_the_same_kho_preserve_folio_calls():
    rep, bt = load("report-sbs.json"), load("bpftrace.json")
    ours = sum(f["folios_preserved"] + f["metadata_folios"] for f in rep["files"] if f["preserve"])
    assert bt["folios"] == ours, bt["output"]


@single_kernel
def test_vmbench_ran():
    res = load("vmbench.json")
    base = sorted(res["untraced"] + res["untraced2"])[len(res["untraced"])]
    for mode in ("light", "folio"):
        med = sorted(res[mode])[len(res[mode]) // 2]
        print(f"vmbench 256 MiB memfd preserve: {mode} ratio {med / base:.3f} (baseline {base / 1e6:.1f} ms)")
        assert med > 0


# ---- the live updates: two kexecs inside the VM (workloads/vm/inside.py) ----

KEXEC_TESTS = ("luo_kexec_simple", "luo_multi_session", "luo_stress_files", "luo_stress_sessions")


@pytest.mark.parametrize("tag", ["kexec-untraced", "kexec-traced"])
def test_kexec_selftests_pass_across_a_real_kexec(tag):
    first, second = load(f"{tag}-1.json"), load(f"{tag}-2.json")
    for t in KEXEC_TESTS:
        assert first[t] == 0 and second[t] == 0, (t, first, second)
        out = open(os.path.join(OUT, f"{tag}-2-{t}.txt")).read()
        assert "PASSED" in out, out[-2000:]


def test_three_boots_two_kernels_jumped():
    boots = [line.split() for line in open(os.path.join(OUT, "boots.txt"))]
    assert [b[0] for b in boots] == ["1", "2", "3"]
    assert len({b[1] for b in boots}) == 3  # a new boot id each time: real kexecs


def _jumped(rep: dict) -> bool:
    """Did the old kernel's recorder write the kexec event before the CPUs
    stopped?  A race luotrace does not slow the jump to win: when it loses,
    the recording ends with the last record written (a second after it, the
    folio counters: a map dump follows lifecycle activity).  The CPUs may stop
    between a chunk's header and its end: a cut inside a chunk is an end too
    (every whole record before it is kept), not a corrupt file."""
    b1 = rep["boots"][0]
    assert b1["ended_by"] in ("kexec", "cut short")
    assert (b1["truncated_reason"] or "no trailer").startswith(("no trailer", "cut inside")), b1
    return b1["ended_by"] == "kexec"


def test_joined_report_follows_each_memfd_across_the_update():
    rep, held, got = load("report-update.json"), load("held.json"), load("retrieved.json")
    b1, b2 = rep["boots"]
    assert b2["ended_by"] == "closed" and b2["joined_by"] == "tsc"
    assert b1["boot_id"] != b2["boot_id"]
    jumped = _jumped(rep)
    assert len(rep["kexec_ns"]) == (1 if jumped else 0)
    files = {f["inode"]: f for f in rep["files"]}
    for t in held["files"]:
        f = files[t["inode"]]
        r = next(x for x in got["files"] if x["inode"] == t["inode"])
        assert r["bad_pages"] == 0  # every byte written before the update came back
        assert f["result"] == "retrieved" and f["retrieved_inode"] == r["retrieved_inode"]
        assert f["folios_preserved"] == t["pages"] == f["folios_restored"]  # holes filled, all restored
        names = [p["name"] for p in f["phases"]]
        assert names.index("preserve") < names.index("retrieve") < names.index("finish")
        pres = next(p for p in f["phases"] if p["name"] == "preserve")
        ret = next(p for p in f["phases"] if p["name"] == "retrieve")
        if jumped:
            assert pres["start_ns"] < rep["kexec_ns"][0] < ret["start_ns"]
        assert pres["start_ns"] + pres["duration_ns"] < ret["start_ns"]
        assert f["blackout_from"] in ("luo_freeze", "kexec", "recording end")
        assert 0 < f["blackout_ns"] < 1800 * 10**9
        assert f["anomalies"] == []
    # the kernel's stress test through the same join: 500 one-page memfds, each retrieved
    stress = [f for f in rep["files"] if f["result"] == "retrieved" and f["size_bytes"] == 4096]
    assert len(stress) >= 500 and all(f["folios_restored"] == 1 for f in stress)


def test_blackout_agrees_with_the_guests_own_clock():
    """luotrace's blackout (old kernel to the retrieve in the new one, joined by
    the TSC) against the guest's wall clock: just before the jump, and at each
    retrieve.  The new kernel's wall clock comes from the RTC (1 s steps), hence
    the tolerance; a blackout counted from the recording's end is an upper bound."""
    rep, jump, got = load("report-update.json"), load("kexec-3.json"), load("retrieved.json")
    for r in got["files"]:
        f = next(x for x in rep["files"] if x["inode"] == r["inode"])
        guest = r["retrieve_realtime_ns"] - jump["realtime_ns"]
        print(f"blackout {r['inode']}: luotrace {f['blackout_ns'] / 1e9:.3f} s from {f['blackout_from']}, "
              f"guest wall clock {guest / 1e9:.3f} s")
        if f["blackout_from"] == "recording end":
            assert f["blackout_ns"] > guest - 2 * 10**9
        else:
            assert abs(f["blackout_ns"] - guest) < 2 * 10**9, (f["blackout_ns"], guest)
