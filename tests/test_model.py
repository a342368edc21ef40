"""The reference model traced by real uprobes, in every mode: luotrace's view
of each file must equal the model's own ground truth, each injected fault
must give exactly its anomaly code, and phases must come in the patch's order.
"""
from __future__ import annotations

import os

import pytest

from exporters.text import render
from tracer.analysis.anomalies import NEEDS_FOLIO_MODE
from tracer.live.model import compare, run_model
from tracer.analysis.replay import replay

# One session per fault, so that each file's outcome is independent.
SESSIONS = [
    "kexec:gmem:2M,memfd:1M",
    "cancel:gmem:1M,memfd:512K",
    "discard:gmem:1M",
    "keep:gmem:1M:hwpoison=50",
    "keep:gmem:1M:enomem",
    "keep:gmem:1M:vmalloc_fail",
    "kexec:gmem:1M:token_enoent",
    "keep:gmem:1M:pass_mismatch",
    "keep:gmem:1M:unbalanced_freeze",
    "keep:gmem:1M:leak_unwind",
    "keep:gmem:1M:late_fallocate",
    "keep:gmem:1M:pfn0",
    "keep:gmem:1M:holes=8",
    "keep:memfd:1M:vmalloc_fail",
    "keep:memfd:512K:leak_unwind",
    "keep:gmem:1M:private_vm,memfd:256K",  # can_preserve says no; the memfd is offered to guest_memfd first
]

EXPECTED_ERRNO = {"private_vm": "ENOENT", "hwpoison": "EHWPOISON", "enomem": "ENOMEM", "vmalloc_fail": "ENOMEM",
                  "token_enoent": "ENOENT",
                  "pass_mismatch": "EINVAL", "unbalanced_freeze": "ENOMEM", "leak_unwind": "ENOMEM"}


# folio: counted from each file's serialized folio array (the default);
# folio-latency: a program per kho_preserve_folio call (--folio-latency);
# folio-standin: guest_memfd stand-ins, on every host (this host's own
# backing is what the others use: real guest_memfds where KVM makes them)
@pytest.fixture(scope="module", params=["light", "folio", "folio-latency", "trace", "folio-standin"])
def traced(request, model, gmem, tmp_path_factory):
    mode = request.param
    out = str(tmp_path_factory.mktemp(mode) / "model.luo")
    res, truth = run_model(mode.split("-")[0], SESSIONS, out, model=model, progress=lambda s: None,
                           folio_latency=mode == "folio-latency", gmem="standin" if mode.endswith("standin") else None)
    want = "standin" if mode.endswith("standin") or gmem.standin else "guest_memfd"
    assert truth["gmem"]["backing"] == res.report["gmem"]["backing"] == want
    return mode.removesuffix("-standin"), res, truth, out


def unknown_from_array(mode: str, t: dict) -> bool:
    """A failed preserve that had preserved folios, counted from folio
    arrays: its unwind hands no array back (and memfd's walk gives no count
    on error), so what the unwind gave back is unknown."""
    return mode == "folio" and t["failed_phase"] == "preserve" and t["folios_preserved"] != 0


def by_inode(report):
    return {f["inode"]: f for f in report["files"]}


def test_every_file_matches_ground_truth(traced):
    mode, res, truth, _ = traced
    assert len(truth["files"]) == 19
    assert compare(res.report, truth) == []
    files = by_inode(res.report)
    for t in truth["files"]:
        f = files[t["inode"]]
        if unknown_from_array(mode, t):
            assert f["folios_unpreserved"] is None and "unwind_incomplete" in f["anomalies_not_checked"]
            assert f["folios_preserved"] == (None if t["handler"] == "memfd" else t["folios_preserved"])
            assert f"not checked on {t['handler']} inode {t['inode']}: unwind_incomplete (" in render(res.report)
        elif mode != "light":
            assert "unwind_incomplete" not in f.get("anomalies_not_checked", [])
            # exact per-folio counters from the BPF maps
            assert f["folios_preserved"] == t["folios_preserved"]
            assert f["folios_unpreserved"] == t["folios_unpreserved"]
            assert f["folios_restored"] == t["folios_restored"]
            assert f["folios_discarded"] == t["folios_discarded"]
        elif t["handler"] == "guest_memfd":
            assert f["folios_preserved"] == t["folios_preserved"]  # from pass 2's count
            assert f["folios_unpreserved"] is None  # not measured in light mode
        assert f["result"] == t["result"]
        assert f["errno"] == t["errno"]


def test_faults_give_exactly_their_anomaly_and_errno(traced):
    mode, res, truth, _ = traced
    files = by_inode(res.report)
    for t in truth["files"]:
        f = files[t["inode"]]
        want = set(t["anomalies"])
        if mode == "light":
            want -= set(NEEDS_FOLIO_MODE)
        if unknown_from_array(mode, t):
            want -= {"unwind_incomplete"}
        got = {a["code"] for a in f["anomalies"]}
        assert got == want, (t["fault"], f["anomalies"])
        if t["fault"] in EXPECTED_ERRNO:
            assert f["errno"] == EXPECTED_ERRNO[t["fault"]], t["fault"]
        if t["fault"] == "none":
            assert f["errno"] is None and not f["anomalies"]
    assert len(res.report["anomalies"]) == sum(len(f["anomalies"]) for f in res.report["files"])


def test_late_fallocate_seen_through_the_real_tracepoint(traced):
    mode, res, truth, _ = traced
    if mode == "light":
        assert "folio_added_while_frozen" in res.report["anomalies_not_checked"]
        return
    t = next(t for t in truth["files"] if t["fault"] == "late_fallocate")
    f = by_inode(res.report)[t["inode"]]
    (a,) = f["anomalies"]
    assert a["code"] == "folio_added_while_frozen"
    # the evidence names the real last page of the real guest_memfd
    assert f"index {t['size_bytes'] // 4096 - 1}" in a["detail"]
    assert f["folios_populated"] == t["folios_populated"] == t["size_bytes"] // 4096 + 1


def test_phases_in_patch_order(traced):
    mode, res, truth, _ = traced
    files = by_inode(res.report)
    for t in truth["files"]:
        if t["handler"] != "guest_memfd" or t["fault"] != "none":
            continue
        f = files[t["inode"]]
        names = [p["name"] for p in f["phases"]]
        pres = f["preserve"]
        assert pres and pres["duration_ns"] > 0
        children = [p for p in f["phases"] if p.get("parent") == "preserve"]
        assert [p["name"] for p in children] == ["count_pass", "fill_pass", "vmalloc"]
        assert all(p["duration_ns"] > 0 for p in f["phases"])
        assert sum(p["duration_ns"] for p in children) <= pres["duration_ns"]
        for p in children:
            assert pres["start_ns"] <= p["start_ns"]
            assert p["start_ns"] + p["duration_ns"] <= pres["start_ns"] + pres["duration_ns"]
        tail = [n for n in names if n not in ("count_pass", "fill_pass", "vmalloc", "can_preserve")]
        expect = {"kexec": ["preserve", "luo_freeze", "retrieve", "finish"],
                  "cancel": ["preserve", "unpreserve"],
                  "discard": ["preserve", "luo_freeze", "finish"]}[t["outcome"]]
        assert tail == expect, (t["outcome"], names)
        starts = [p["start_ns"] for p in f["phases"]]
        assert starts == sorted(starts)


def test_sessions_and_blackout(traced):
    mode, res, truth, _ = traced
    sessions = res.report["sessions"]
    assert len(sessions) == len(SESSIONS)
    first = sessions[0]
    assert len(first["files"]) == 2 and not first["cancelled"]
    assert first["blackout_ns"] > 0
    assert sessions[1]["cancelled"] and sessions[1]["blackout_ns"] is None
    # the freeze of each file sits inside its session's blackout
    for f in res.report["files"]:
        if f["session"] == 1:
            lf = next(p for p in f["phases"] if p["name"] == "luo_freeze")
            assert first["blackout_start_ns"] <= lf["start_ns"]
            assert lf["start_ns"] + lf["duration_ns"] <= first["blackout_start_ns"] + first["blackout_ns"]


def test_replay_equals_live(traced):
    mode, res, truth, out = traced
    assert os.path.getsize(out) > 0
    assert replay(out) == res.report


def test_probe_strategies_and_accounting(traced):
    mode, res, truth, _ = traced
    probes = res.report["probes"]
    # the folio source not used (folio mode has two) is listed as skipped, with why
    unused = {"folio": {"kho_preserve_folio", "kho_restore_folio", "kho_unpreserve_folio"},
              "folio-latency": {"kho_preserve_pages", "kho_restore_vmalloc", "kho_restore_pages"}}.get(mode, set())
    assert probes and all(p["status"] == "attached" for p in probes if p["symbol"] not in unused)
    assert all(p["status"] == "skipped" and "folio" in p["reason"] for p in probes if p["symbol"] in unused)
    attached = {p["symbol"] for p in probes if p["status"] == "attached"}
    assert {p["strategy"] for p in probes} == ({"uprobe"} if mode == "light" else {"uprobe", "tracepoint"})
    assert ("kho_preserve_folio" in attached) == (mode in ("folio-latency", "trace"))
    assert ("kho_preserve_pages" in attached) == (mode == "folio")
    progs = res.report["bpf"]["programs"]
    if mode == "folio":
        # one program run per page of a folio array (256 entries) and per KHO chunk page, none per folio
        kept = sum(f["folios_preserved"] for f in res.report["files"] if f["failed_phase"] != "preserve")
        tried = sum(f["folios_preserved"] or 0 for f in res.report["files"])
        vmallocs = progs["kho_preserve_vmalloc_entry"]["run_cnt"]
        assert kept // 256 <= progs["kho_vmalloc_page_entry"]["run_cnt"] <= tried // 256 + 2 * vmallocs
        assert "kho_preserve_folio_entry" not in progs
        # and the way back: a run per page of each array restored (retrieve, discard), none per folio
        back = sum((f["folios_restored"] or 0) + (f["folios_discarded"] or 0) for f in res.report["files"])
        restores = progs["kho_restore_vmalloc_entry"]["run_cnt"]
        assert back // 256 <= progs["kho_restore_array_page_entry"]["run_cnt"] <= back // 256 + 2 * restores + 2
        assert "kho_restore_folio_entry" not in progs
        # a cancel: one run reads its whole outgoing array (kho_unpreserve_vmalloc), none per folio
        cancels = [f for f in res.report["files"] if f["result"] == "cancelled" and f["folios_preserved"]]
        assert cancels and all(f["folios_unpreserved"] == f["folios_preserved"] for f in cancels)
        assert "kho_unpreserve_folio_entry" not in progs
    assert res.report["folio_source"] == {"light": None, "folio": "array"}.get(mode, "calls")
    ev = res.report["events"]
    assert ev["lost"] == 0 and ev["received"] > 0
    assert res.report["bpf"]["run_cnt"] > 0 and res.report["bpf"]["run_time_ns"] > 0
    if mode == "trace":
        total = sum(t["folios_preserved"] for t in truth["files"])
        streamed = sum(f.get("streamed_events", {}).get("kho_preserve_folio", 0) for f in res.report["files"])
        assert streamed == total
