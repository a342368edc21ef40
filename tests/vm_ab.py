"""Host-side checks of `make vmtest-ab` (not part of `make test`): two
series' kernels (the same one for an A/A) booted in turn, A B A B ..., each
boot running the same benchmark (workloads/vm/ab.py); each side's doctor
names its revision and fails nothing, every scenario's errno is what
userspace got, the race check ran on each side, and compare took the boot
as its unit, left its JSON and plot per size, and an A/A called nothing."""
from __future__ import annotations

import json
import os

import pytest

OUT = os.environ.get("LUOTRACE_VM_AB_OUT", "/tmp/luotrace-ab")
SIDES = ["A", "B"]
SERIES = {"A": os.environ.get("A", "seed"), "B": os.environ.get("B", "latest")}
BOOTS = int(os.environ.get("BOOTS", "3"))
# the revision each series looks like to the catalog (racy is the seed with another freeze)
REVISION = {"seed": "seed", "racy": "seed", "latest": "latest"}
# series whose kvm_gmem_freeze waits for allocations in flight: no folio may enter a frozen inode
GRACE_PERIOD = {"seed", "latest"}


def load(*parts: str):
    with open(os.path.join(OUT, *parts)) as f:
        return json.load(f)


@pytest.mark.parametrize("side", SIDES)
def test_each_side_ran_whole(side):
    done = load(side, "done.json")
    assert done["series"] == SERIES[side] and all(rc == 0 for rc in done["exit"].values()), done


@pytest.mark.parametrize("side", SIDES)
def test_doctor_names_the_revision_and_fails_nothing(side):
    text = open(os.path.join(OUT, side, "doctor.txt")).read()
    assert "FAIL" not in text, text
    line = next(ln for ln in text.splitlines() if "kernel: guest_memfd revision" in ln)
    assert f"looks like revision {REVISION.get(SERIES[side], '')}" in line, line
    print(f"{side}: {line}")


def races(side: str):
    """Per racer run: (preserve errno, folios the racer added to the frozen inode as luotrace saw them)."""
    rep, truth = load(side, "scenarios-report.json"), load(side, "scenarios.json")
    files = {f["inode"]: f for f in rep["files"]}
    out = []
    for t in truth["files"]:
        if t["scenario"] != "race":
            continue
        f = files[t["inode"]]
        late = [a for a in f["anomalies"] if a["code"] == "folio_added_while_frozen"]
        out.append((t["errno"], sum(a.get("count") or 1 for a in late), t["racer"]))
    return out


@pytest.mark.parametrize("side", SIDES)
def test_scenarios_give_what_userspace_got_and_the_race_check_ran(side):
    rep, truth = load(side, "scenarios-report.json"), load(side, "scenarios.json")
    files = {f["inode"]: f for f in rep["files"]}
    for t in truth["files"]:
        f = files[t["inode"]]
        assert f["errno"] == t["errno"], (t, f)
        if REVISION.get(SERIES[side]) == "latest" and f["result"] != "rejected" and f["preserve"] and t["scenario"] != "novm":
            assert f["vm_token_in"] == "preserve" and f["vm_token"], f  # no freeze op: preserve took it
        assert not any(p["name"] == "luo_freeze" for p in f["phases"])  # no kexec in this boot
        if t["scenario"] == "novm":  # the VM file was never put in the session
            if REVISION.get(SERIES[side]) == "latest":
                assert (f["result"], f["errno"], f["vm_token_errno"]) == ("error", "ENOENT", "ENOENT"), f
            else:
                assert f["result"] == "cancelled" and f["vm_token_in"] is None, f  # no kexec: no freeze op ran
    runs = races(side)
    held = sum(1 for _e, late, _r in runs if not late)
    print(f"{side}: race: the freeze held in {held} of {len(runs)} runs; folios added while frozen per run: "
          f"{[late for _e, late, _r in runs]}; racer refused (EPERM) per run: {[r['refused'] for _e, _l, r in runs]}")
    assert len(runs) == load(side, "done.json")["races"]
    if SERIES[side] in GRACE_PERIOD:
        assert held == len(runs), runs  # the grace period: nothing in flight adds after the freeze returns


@pytest.mark.parametrize("side", SIDES)
def test_across_the_kexec_the_token_is_taken_where_the_revision_takes_it(side):
    rep, held = load(side, "update-report.json"), load(side, "held.json")
    files = {f["inode"]: f for f in rep["files"]}
    assert len(rep["boots"]) == 2 and rep["kexec_ns"], rep["boots"]
    results = sorted(files[t["inode"]]["result"] for t in held["files"])
    assert results == ["discarded", "retrieved", "retrieved"], results
    for t in held["files"]:
        f = files[t["inode"]]
        freeze = [p for p in f["phases"] if p["name"] == "luo_freeze"]
        if REVISION.get(SERIES[side]) == "latest":  # no freeze op: no freeze phase, the token from preserve
            assert not freeze and f["vm_token_in"] == "preserve" and f["vm_token"] == t["vm_token"], f
        elif freeze:  # the seed's freeze op runs after kernel_kexec: recorded when the recorder wins that race
            assert f["vm_token_in"] == "luo_freeze" and f["vm_token"] == t["vm_token"], f
        else:
            assert f["vm_token_in"] is None and f["vm_token"] is None, f
        print(f"{side}: across the kexec: inode {f['inode']} {f['result']}, token taken in {f['vm_token_in']}")


@pytest.mark.parametrize("side", SIDES)
def test_the_model_of_each_revision_agrees_with_its_kernel(side):
    """Where they differ the kernel is right: every difference is a known one."""
    res = load(side, "model-vs-kernel.json")
    assert res, "nothing compared"
    print(f"{side}: " + open(os.path.join(OUT, side, "model-vs-kernel.txt")).read())
    for name, r in res.items():
        assert all(d["explained"] for d in r["differences"]), (name, r["differences"])


def test_a_phase_one_revision_dropped_is_listed_one_sided():
    res = load("compare-update.json")
    one = {(r["handler"], r["phase"]): r["side"] for r in res["one_sided"]}
    a, b = (REVISION.get(SERIES[s]) for s in SIDES)
    # only a side that recorded its freeze op (the recorder won the race with the jump) has the phase
    ran = [any(p["name"] == "luo_freeze" for f in load(s, "update-report.json")["files"]
               if f["handler"] == "guest_memfd" for p in f["phases"]) for s in SIDES]
    if a != b and any(ran):
        assert one.get(("guest_memfd", "luo_freeze")) == ("A" if ran[0] else "B"), res["one_sided"]
    assert ("guest_memfd", "preserve") not in one  # every revision preserves
    print(open(os.path.join(OUT, "compare-update.txt")).read())


def test_boots_alternate_and_every_boot_is_labelled():
    """A B A B ...: each boot's line in boots.txt in that order, and each
    boot's recordings carry the side, the series and the boot."""
    from tracer.recording import format as rec
    lines = [ln.split() for ln in open(os.path.join(OUT, "boots.txt")) if " boot " in ln and "attempt" in ln]
    ok = [(ln[0], int(ln[3])) for ln in lines if ln[6] == "ok"]
    assert [side for side, _b in ok] == ["A", "B"] * (len(ok) // 2), ok
    deaths = open(os.path.join(OUT, "deaths.txt")).read() if os.path.exists(os.path.join(OUT, "deaths.txt")) else ""
    print(f"boots: {len(ok)} ran ({BOOTS} a side asked); deaths: {deaths.strip() or 'none'}")
    boot_ids = set()
    for side, boot in ok:
        done = load(side, f"boot-{boot}", "done.json")
        assert done["series"] == SERIES[side] and all(rc == 0 for rc in done["exit"].values()), done
        boot_ids.add(done["boot_id"])
        for size in ("64M", "256M"):
            h = rec.read(os.path.join(OUT, side, f"boot-{boot}", f"bench-{size}.luo")).header
            assert h["labels"] == {"series": SERIES[side], "side": side, "boot": str(boot)}, h["labels"]
            assert h["clock"]["boot_id"] == done["boot_id"]
    assert len(boot_ids) == len(ok)  # every boot a boot of its own


@pytest.mark.parametrize("size", ["64M", "256M"])
def test_compare_took_the_boot_as_its_unit_and_left_its_json_and_plot(size):
    res = load(f"compare-{size}.json")
    rows = {(r["handler"], r["phase"]): r for r in res["phases"]}
    assert ("guest_memfd", "preserve") in rows and rows[("guest_memfd", "preserve")]["total"]
    lv = res["levels"]
    assert lv["unit"] == "run" and lv["runs_a"] >= 2 and lv["runs_b"] >= 2, lv
    assert all(r["n_a"] >= 8 * r["runs_a"] and r["n_b"] >= 8 * r["runs_b"] for r in res["phases"]), res["phases"]
    assert open(os.path.join(OUT, f"compare-{size}.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    if SERIES["A"] == SERIES["B"]:
        assert res["changed"] == [], res["changed"]  # an A/A: the same kernel calls nothing
    for r in res["phases"]:
        print(f"{size} {r['phase']}: between boots A {r['between_run_sd_a']}, B {r['between_run_sd_b']}; "
              f"within a boot A {r['within_run_sd_a']}, B {r['within_run_sd_b']}")
    print(open(os.path.join(OUT, f"compare-{size}.txt")).read())
