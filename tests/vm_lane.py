"""Host-side checks of `make vmtest` (not part of `make test`): luotrace ran
inside a VM booted on a real Linux 7.2 LUO kernel; its results are files in
LUOTRACE_VM_OUT."""
from __future__ import annotations

import json
import os
import re

import pytest

OUT = os.environ.get("LUOTRACE_VM_OUT", "/tmp/luotrace-vmtest")
# LUOTRACE_VM_ONLY=kexec: only the selftests and memfds across the kexecs ran;
# LUOTRACE_VM_ONLY=gmem: only the guest_memfd part (single kernel and across the kexecs)
ONLY = os.environ.get("LUOTRACE_VM_ONLY", "all")
single_kernel = pytest.mark.skipif(ONLY != "all", reason=f"LUOTRACE_VM_ONLY={ONLY}: the memfd single-kernel part did not run")
kexec_part = pytest.mark.skipif(ONLY not in ("all", "kexec"), reason=f"LUOTRACE_VM_ONLY={ONLY}: the selftests did not run")
gmem_part = pytest.mark.skipif(ONLY not in ("all", "gmem"), reason=f"LUOTRACE_VM_ONLY={ONLY}: the guest_memfd part did not run")


def referee(name):
    """bpftrace's counts, once it is shown to have counted every call: a
    kprobe program the kernel skipped (its CPU inside BPF already: a map
    syscall preempted there, workloads/vm/inside.py TRACER_CPUS) would leave
    the referee short, and the comparison would judge luotrace on a wrong number."""
    bt = load(name)
    assert bt.get("missed", 0) == 0, f"{name}: the kernel skipped {bt['missed']} runs of bpftrace's programs"
    return bt


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


def folio_probes(tag: str) -> tuple:
    """The per-folio probes a tag's run attaches: folio mode reads each
    file's folio array a page at a time (kho_preserve_pages); with
    --folio-latency a program runs on every kho_preserve_folio."""
    if tag.endswith("light"):
        return ()
    return ("kho_preserve_folio",) if tag.endswith("latency") else ("kho_preserve_pages",)


@single_kernel
@pytest.mark.parametrize("tag", ["light", "folio", "folio-kprobe", "folio-latency"])
def test_real_attach_on_real_symbols(tag):
    rep = load(f"report-{tag}.json")
    strat = {p["symbol"]: (p["strategy"], p["status"]) for p in rep["probes"]}
    allowed = {"kprobe"} if tag.endswith("kprobe") else {"kprobe", "fentry"}
    for sym in ("memfd_luo_preserve", "luo_preserve_file") + folio_probes(tag):
        assert strat[sym][1] == "attached" and strat[sym][0] in allowed, (sym, strat[sym])
    assert rep["folio_source"] == {"light": None, "folio-latency": "calls"}.get(tag, "array")


@single_kernel
@pytest.mark.parametrize("mode", ["light", "folio", "folio-kprobe", "folio-latency"])
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
    rep = load("report-folio-latency.json")  # seen per call only
    for f in rep["files"]:
        if f["preserve"]:
            assert f["metadata_folios"] >= 1  # kho_alloc_preserve's own page, counted apart


@single_kernel
def test_luo_selftest_passes_with_and_without_luotrace():
    res = load("selftests.json")
    assert res["untraced_rc"] == 0 and res["traced_rc"] == 0


@single_kernel
def test_bpftrace_counts_the_same_kho_preserve_folio_calls():
    rep, bt = load("report-sbs.json"), referee("bpftrace.json")
    ours = sum(f["folios_preserved"] for f in rep["files"] if f["preserve"])  # from the folio arrays
    assert rep["folio_source"] == "array" and bt["folios"] == ours, bt["output"]


def cancelled_from_arrays(report: str, counted: str, handler: str) -> None:
    """A cancel's unpreserved folios, read by one program from the file's
    outgoing folio array, against bpftrace counting kho_unpreserve_folio inside
    the handler's unpreserve on the same run, and against what it preserved."""
    rep, bt = load(report), referee(counted)
    files = [f for f in rep["files"] if f["handler"] == handler and f["result"] == "cancelled"]
    assert rep["folio_source"] == "array" and files
    ours = sum(f["folios_unpreserved"] for f in files)
    print(f"{report} cancels: bpftrace {bt['unpreserved']} kho_unpreserve_folio calls, luotrace {ours} from the arrays")
    assert bt["unpreserved"] == ours > 0, bt["output"]
    assert all(f["folios_unpreserved"] == f["folios_preserved"] for f in files)
    assert "kho_unpreserve_folio" not in {p["symbol"] for p in rep["probes"] if p["status"] == "attached"}


@single_kernel
def test_memfd_cancels_counted_from_the_arrays_equal_bpftraces():
    cancelled_from_arrays("report-sbs.json", "bpftrace.json", "memfd")


def vmbench_ratios(path: str, what: str) -> None:
    """Each setting's median against the median of the untraced runs before
    and after it in the same VM, with its spread; printed for the notes."""
    res = load(path)
    base = sorted(res["untraced"] + res["untraced2"])[len(res["untraced"])]
    assert base > 0
    for mode in ("light", "folio", "folio-latency"):
        runs = sorted(res[mode])
        med = runs[len(runs) // 2]
        print(f"vmbench 256 MiB {what} preserve: {mode} ratio {med / base:.3f} "
              f"(spread {runs[0] / base:.3f}-{runs[-1] / base:.3f}, baseline {base / 1e6:.1f} ms, n={len(runs)})")
        assert med > 0


@kexec_part
def test_vmbench_ran():
    vmbench_ratios("vmbench.json", "memfd")


# ---- the live updates: two kexecs inside the VM (workloads/vm/inside.py) ----

KEXEC_TESTS = ("luo_kexec_simple", "luo_multi_session", "luo_stress_files", "luo_stress_sessions")


@kexec_part
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


@kexec_part
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


def test_the_new_kernel_is_traced_before_its_first_retrieve():
    """The retrieves start when the recorder says "tracing" (the VMM waits on
    readiness, not a sleep): time from its start to that line in the new
    kernel, cold (its first start after the kexec), and warm: compiling, and
    opening the programs the start before kept."""
    got = load("ready.json")
    print("time to ready in the new kernel: " + ", ".join(f"{k} {v:.2f} s" for k, v in got.items()))
    assert "new kernel, cold" in got and all(0 < v < 600 for v in got.values())
    if "new kernel, warm, nothing changed" in got:  # the warm starts run last (see inside.main)
        assert got["new kernel, warm, nothing changed"] < got["new kernel, warm, compiling"]
    rep = load("report-update.json")
    assert any(f["result"] == "retrieved" and f["folios_restored"] for f in rep["files"])  # the retrieves were seen


def test_restores_counted_from_the_arrays_equal_bpftraces_kho_restore_folio_calls():
    """The new kernel: bpftrace counting kho_restore_folio inside the handlers'
    retrieve and finish, against the folios luotrace counted from each file's
    incoming folio array (a program per array page, none per folio)."""
    rep, bt = load("report-update.json"), referee("bpftrace-restores.json")
    assert rep["folio_source"] == "array"
    ours = sum((f["folios_restored"] or 0) + (f["folios_discarded"] or 0) for f in rep["files"])
    print(f"new kernel: bpftrace {bt['folios']} kho_restore_folio calls, luotrace {ours} from the arrays")
    assert bt["folios"] == ours, bt["output"]
    probes = {p["symbol"]: p for p in rep["probes"]}
    assert probes["kho_restore_folio"]["status"] == "skipped"
    assert probes["kho_restore_pages"]["status"] == probes["kho_restore_vmalloc"]["status"] == "attached"


def test_the_update_recorders_programs_were_never_skipped():
    """The recorders of the update (both kernels) ran on the tracer CPU, the
    work on the other: the kernel skipped none of their programs' runs (it
    counts them, report bpf.missed), so nothing they counted is short."""
    rep = load("report-update.json")
    print(f"update: {rep['bpf']['run_cnt']} runs, {rep['bpf']['missed']} skipped")
    assert rep["bpf"]["missed"] == 0, rep["bpf"]["programs"]


@kexec_part
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


# ---- the guest_memfd LUO handler under review, built into the lane's kernel
# (workloads/vm/patches/) and driven by workloads/gmem_luo.py ----

GMEM_TAGS = ["gmem-folio", "gmem-folio-kprobe", "gmem-folio-latency", "gmem-light"]
GMEM_REQUIRED = ("kvm_gmem_luo_preserve", "kvm_gmem_freeze", "kvm_gmem_luo_freeze", "kvm_gmem_luo_unpreserve",
                 "kvm_gmem_luo_can_preserve", "luo_preserve_file", "liveupdate_get_token_outgoing")
# the patch's order inside a preserve (count_pass/fill_pass only when the walk is not inlined)
PATCH_ORDER = ["can_preserve", "preserve", "count_pass", "fill_pass", "vmalloc"]


def by_inode(rep):
    return {(f["handler"], f["inode"]): f for f in rep["files"]}


def gmem_file(rep, t):
    return by_inode(rep)[("guest_memfd", t["inode"])]


def first_index(anomaly):
    m = re.search(r"first at index (\d+)", anomaly["detail"])
    return int(m.group(1)) if m else None


@gmem_part
@pytest.mark.parametrize("tag", GMEM_TAGS)
def test_gmem_probes_attach_to_the_patched_kernel(tag):
    rep = load(f"report-{tag}.json")
    strat = {p["symbol"]: (p["strategy"], p["status"], p["reason"]) for p in rep["probes"]}
    allowed = {"kprobe"} if tag.endswith("kprobe") else {"kprobe", "fentry"}
    print(f"{tag}: " + ", ".join(f"{s}={v[0]}/{v[1]}" for s, v in sorted(strat.items())))
    # a cancel: counted per call with --folio-latency, else from the array in kho_unpreserve_vmalloc
    per_call = tag.endswith("latency")
    need = GMEM_REQUIRED + folio_probes(tag) + (("kho_unpreserve_folio",) if per_call else ("kho_unpreserve_vmalloc",))
    for sym in need:
        assert strat[sym][1] == "attached" and strat[sym][0] in allowed, (sym, strat[sym])
    if tag in ("gmem-folio", "gmem-folio-kprobe"):
        assert strat["kho_unpreserve_folio"][1] == "skipped", strat["kho_unpreserve_folio"]
    if not tag.endswith("kprobe"):
        assert strat["kvm_gmem_luo_preserve"][0] == "fentry"
    # the walk is static and called twice: attached, or listed as not there (inlined), never silently absent
    assert strat["kvm_gmem_luo_walk_folios"][1] in ("attached", "missing"), strat["kvm_gmem_luo_walk_folios"]


@gmem_part
@pytest.mark.parametrize("tag", GMEM_TAGS)
def test_gmem_scenarios_give_their_result_errno_and_counts(tag):
    rep, truth = load(f"report-{tag}.json"), load(f"truth-{tag}.json")
    folio = tag != "gmem-light"
    seen = {t["scenario"] for t in truth["files"]}
    assert {"keep", "cancel", "hwpoison", "race"} <= seen, seen
    for t in truth["files"]:
        f = gmem_file(rep, t)
        assert f["errno"] == t["errno"], (t, f)  # what userspace got is what luotrace says
        if t["scenario"] == "rejected":
            assert (f["result"], f["errno"]) == ("rejected", "ENOENT") and f["preserve"] is None
            continue
        names = [p["name"] for p in f["phases"]]
        order = [n for n in PATCH_ORDER if n in names]
        assert [n for n in names if n in PATCH_ORDER] == order, names  # phases in the patch's order
        codes = [a["code"] for a in f["anomalies"]]
        assert "freeze_unbalanced" not in codes and "unwind_incomplete" not in codes, f["anomalies"]
        if t["scenario"] in ("keep", "cancel"):  # closed at exit: unpreserved
            assert f["result"] == "cancelled" and f["errno"] is None
            assert f["nr_folios"] in (None, t["pages"])
            if folio:
                assert f["folios_preserved"] == t["pages"] == f["folios_unpreserved"]
                assert f["folios_populated"] == t["pages"]
            assert codes == []
        elif t["scenario"] == "hwpoison":
            assert t["poison_error"] is None, t["poison_error"]
            assert (f["result"], f["errno"]) == ("error", "EHWPOISON")
            if tag == "gmem-folio-latency":  # every folio before the poisoned one was preserved, and given back
                assert f["folios_preserved"] == t["poisoned_page"] == f["folios_unpreserved"]
            elif folio:  # from the arrays: the unwind hands none back, so what it gave back is unknown, and said
                assert f["folios_preserved"] == t["poisoned_page"] and f["folios_unpreserved"] is None
                assert f["anomalies_not_checked"] == ["unwind_incomplete"]
        elif t["scenario"] == "race":
            late = [a for a in f["anomalies"] if a["code"] == "folio_added_while_frozen"]
            print(f"{tag} race: preserve errno {t['errno']}, racer {t['racer']}, luotrace {f['anomalies']}")
            for a in late:  # the evidence names a page the racer touches, and only those change
                lo, hi = t["race_pages"]
                assert lo <= first_index(a) < hi, a
            if t["errno"] == "EINVAL":  # the pass-count WARN fired: pass 2 saw the racer's folio
                assert "pass_count_mismatch" in codes or late, f["anomalies"]


@gmem_part
@pytest.mark.parametrize("report, counted", [("report-gmem-folio.json", "bpftrace-gmem.json"),
                                             ("report-update.json", "bpftrace-gmem-update.json")])
def test_gmem_bpftrace_counts_the_same_kho_preserve_folio_calls(report, counted):
    """bpftrace counting kho_preserve_folio inside kvm_gmem_luo_preserve on the
    same run (not those of KHO's metadata page, inside kho_alloc_preserve),
    against the counts luotrace read from each file's folio array."""
    rep, bt = load(report), referee(counted)
    assert rep["folio_source"] == "array"
    ours = sum(f["folios_preserved"] for f in rep["files"] if f["handler"] == "guest_memfd" and f["preserve"])
    print(f"{report}: bpftrace {bt['folios']}, luotrace {ours}")
    assert bt["folios"] == ours, bt["output"]


@gmem_part
def test_gmem_cancels_counted_from_the_arrays_equal_bpftraces():
    cancelled_from_arrays("report-gmem-folio.json", "bpftrace-gmem.json", "guest_memfd")


@gmem_part
def test_gmem_joined_report_follows_each_guest_memfd_across_the_update():
    rep, held, got = load("report-update.json"), load("held-gmem.json"), load("retrieved-gmem.json")
    jumped = _jumped(rep)
    assert {t["scenario"] for t in held["files"]} == {"keep", "discard"}
    for t in held["files"]:
        f = gmem_file(rep, t)
        r = next(x for x in got["files"] if x["inode"] == t["inode"])
        names = [p["name"] for p in f["phases"]]
        assert f["anomalies"] == [] and f["errno"] is None, f
        pres = next(p for p in f["phases"] if p["name"] == "preserve")
        if t["scenario"] == "keep":
            assert r["bad_pages"] == 0  # every byte written before the update came back
            assert f["result"] == "retrieved" and f["retrieved_inode"] == r["retrieved_inode"]
            assert f["folios_preserved"] == t["pages"] == f["folios_restored"]
            assert names.index("preserve") < names.index("retrieve") < names.index("finish")
            ret = next(p for p in f["phases"] if p["name"] == "retrieve")
            if jumped:
                assert pres["start_ns"] < rep["kexec_ns"][0] < ret["start_ns"]
            assert 0 < f["blackout_ns"] < 1800 * 10**9
        else:  # never retrieved: finish gave every folio back
            assert f["result"] == "discarded" and r["retrieved_inode"] is None
            assert f["folios_preserved"] == t["pages"] == f["folios_discarded"]
            assert names.index("preserve") < names.index("finish") and "retrieve" not in names


@gmem_part
def test_gmem_timeline_spans_both_kernels():
    tl, held = load("timeline-update.json"), load("held-gmem.json")
    events = tl["traceEvents"] if isinstance(tl, dict) else tl
    boots = [e for e in events if e.get("cat") == "boot"]
    assert len(boots) == 2 and boots[0]["args"]["boot_id"] != boots[1]["args"]["boot_id"]
    tracks = {e["args"]["name"]: (e["pid"], e["tid"]) for e in events if e.get("name") == "thread_name"}
    for t in held["files"]:
        track = tracks[f"guest_memfd inode {t['inode']}"]
        slices = {e["name"] for e in events if e.get("ph") == "X" and (e["pid"], e["tid"]) == track}
        assert {"preserve", "finish"} <= slices and ("retrieve" in slices) == (t["scenario"] == "keep"), slices


@gmem_part
def test_gmem_vmbench_ran():
    vmbench_ratios("vmbench-gmem.json", "guest_memfd")


@gmem_part
def test_gmem_vmbench_cancels_run_no_program_per_folio():
    """The vmbench's cancels (each 256 MiB guest_memfd preserved, then closed):
    folio mode counts each from its array in the one kho_unpreserve_vmalloc
    run, --folio-latency runs a program per folio.  Printed: the unpreserve
    phase's median and the BPF time the cancels' folio probes took."""
    from tracer.analysis.replay import replay
    for cfg in ("folio", "folio-latency"):
        rep = replay(os.path.join(OUT, f"bench-guest_memfd-{cfg}.luo"))
        files = [f for f in rep["files"] if f["result"] == "cancelled" and f["size_bytes"] == 256 << 20]
        assert len(files) == 5 and all(f["folios_unpreserved"] == f["folios_preserved"] == 65536 for f in files)
        un = sorted(p["duration_ns"] for f in files for p in f["phases"] if p["name"] == "unpreserve")
        progs = rep["bpf"]["programs"]
        per_call = {k: v for k, v in progs.items() if "kho_unpreserve_folio" in k}
        array = {k: v for k, v in progs.items() if "kho_unpreserve_vmalloc" in k}
        runs = sum(v["run_cnt"] for v in per_call.values())
        bpf_ns = sum(v["run_time_ns"] for v in {**per_call, **array}.values())
        print(f"vmbench guest_memfd cancels, {cfg}: unpreserve median {un[len(un) // 2] / 1e6:.1f} ms "
              f"[{un[0] / 1e6:.1f}-{un[-1] / 1e6:.1f}], kho_unpreserve_folio runs {runs}, "
              f"BPF {bpf_ns / 1e6:.2f} ms for {len(un)} cancels "
              f"({100 * bpf_ns / sum(un):.2f} % of the unpreserve phases)")
        assert runs == 0 if cfg == "folio" else runs >= 5 * 65536
        if cfg == "folio":
            assert sum(v["run_cnt"] for v in array.values()) >= 5


@gmem_part
def test_model_and_kernel_agree_or_the_difference_is_explained():
    res = load("model-vs-kernel.json")
    assert any(k.startswith("single kernel") for k in res) and any(k.startswith("across") for k in res), list(res)
    for name, r in res.items():
        for d in r["differences"]:
            print(f"{name}: {d['field']}: kernel {d['kernel']} / model {d['model']} -- {d['explained']}")
        assert all(d["explained"] for d in r["differences"]), (name, r["differences"])


@gmem_part
def test_top_watched_the_gmem_update_in_both_kernels():
    """luotrace top --plain, probes of its own, in the old kernel until the
    jump and in the new one with --before: every kept file retrieved with
    restored = preserved, the discarded one accounted, nothing missing."""
    held = load("held-gmem.json")
    old, new = (open(os.path.join(OUT, n)).read() for n in ("top-1.log", "top-2.log"))
    for t in held["files"]:
        # the old kernel: each file appeared in the update and was preserved before the jump
        assert re.search(rf"gmem {t['inode']} s\S+ (appeared|phase): preserved ", old), (t["inode"], old[-2000:])
        line = next((ln for ln in new.splitlines() if re.search(rf"gmem {t['inode']} s\S+ \w+: "
                                                                 rf"(retrieved|discarded) finish ", ln)), None)
        assert line is not None, (t["inode"], new[-3000:])
        if t["scenario"] == "keep":
            assert "retrieved finish" in line and f"restored {t['pages']} of {t['pages']} preserved" in line, line
        else:
            assert "discarded finish" in line and f"restored 0 of {t['pages']} preserved" in line, line
    assert "missing:" not in new
    last = [ln for ln in new.splitlines() if " update " in ln][-1]
    assert last.endswith("ended") and " update done " in last, last
