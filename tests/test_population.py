"""guest_memfd population seen through the kernel's real filemap tracepoints,
checked against the driver's ground truth and against bpftrace counting the
same tracepoint on the same run."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import load_json
from tracer.probes.plan import Options
from tracer.analysis.replay import replay
from tracer.live.runner import run
from tracer.kernel.backing import gmem_superblock_dev

MiB = 1 << 20


def populate_cmd(truth: str, *sizes: str, punch: bool = False):
    return [sys.executable, "-m", "workloads.populate", "--json", truth, *sizes] + (["--punch"] if punch else [])


# this host's own guest_memfd files (real where KVM makes them), and stand-ins on every host
@pytest.mark.parametrize("mode,backing", [("folio", None), ("trace", None), ("folio", "standin")])
def test_64mib_file_counted_exactly_and_files_kept_apart(mode, backing, gmem, tmp_path):
    truth_path = str(tmp_path / "truth.json")
    res = run(Options(mode=mode, handlers=["population"], gmem=backing), str(tmp_path / "pop.luo"),
              command=populate_cmd(truth_path, "64M", "16M"), progress=lambda s: None)
    truth = load_json(truth_path)
    assert truth["gmem"] == res.report["gmem"]["backing"] == ("standin" if backing or gmem.standin else "guest_memfd")
    big, small = truth["files"]
    files = {f["inode"]: f for f in res.report["files"]}
    assert files[big["inode"]]["folios_populated"] == 16384
    assert files[small["inode"]]["folios_populated"] == 4096
    # nothing else on the guest_memfd superblock was populated during the run
    others = [f for i, f in files.items() if i not in (big["inode"], small["inode"])]
    assert all(not f["folios_populated"] for f in others)
    assert {p["strategy"] for p in res.report["probes"]} == {"tracepoint"}
    assert res.report["events"]["lost"] == 0
    assert replay(str(tmp_path / "pop.luo")) == res.report


def test_light_mode_attaches_no_population_probe(gmem, tmp_path):
    with pytest.raises(Exception) as e:
        run(Options(mode="light", handlers=["population"]), str(tmp_path / "x.luo"),
            command=populate_cmd(str(tmp_path / "t.json"), "4M"), progress=lambda s: None)
    assert "no probe" in str(e.value)


def _start_bpftrace(dev: int):
    prog = ("tracepoint:filemap:mm_filemap_add_to_page_cache /args->s_dev == %d/ { @[args->i_ino] = count(); }"
            % dev)
    p = subprocess.Popen(["bpftrace", "-e", prog], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while True:  # bpftrace may warn about RLIMIT_MEMLOCK before "Attaching 1 probe..."
        line = p.stdout.readline()
        seen.append(line)
        assert line and len(seen) < 20, "".join(seen)
        if "Attaching" in line:
            break
    time.sleep(0.5)
    return p


def test_bpftrace_side_by_side_counts_the_same(gmem, tmp_path):
    dev = gmem_superblock_dev()
    bt = _start_bpftrace(dev)
    try:
        truth_path = str(tmp_path / "truth.json")
        res = run(Options(mode="folio", handlers=["population"]), str(tmp_path / "pop.luo"),
                  command=populate_cmd(truth_path, "32M", "8M", "4M"), progress=lambda s: None)
    finally:
        bt.send_signal(signal.SIGINT)
        out, _ = bt.communicate(timeout=30)
    bpftrace_counts = {int(i): int(n) for i, n in re.findall(r"@\[(\d+)\]: (\d+)", out)}
    truth = load_json(truth_path)
    for t in truth["files"]:
        ours = next(f for f in res.report["files"] if f["inode"] == t["inode"])["folios_populated"]
        assert ours == bpftrace_counts[t["inode"]] == t["size_bytes"] // 4096


def test_repopulated_page_counts_again(gmem, tmp_path):
    """Punch + re-allocate: the page cache really gains a folio twice."""
    truth_path = str(tmp_path / "truth.json")
    res = run(Options(mode="folio", handlers=["population"]), str(tmp_path / "pop.luo"),
              command=populate_cmd(truth_path, "1M", punch=True), progress=lambda s: None)
    (t,) = load_json(truth_path)["files"]
    f = next(f for f in res.report["files"] if f["inode"] == t["inode"])
    assert f["folios_populated"] == 257


def test_repeated_population_of_the_same_inode(gmem, tmp_path):
    """Populate, punch everything, populate again, three times: per-CPU cached
    counts and the folded map counts add up exactly."""
    truth_path = str(tmp_path / "truth.json")
    res = run(Options(mode="folio", handlers=["population"]), str(tmp_path / "pop.luo"),
              command=populate_cmd(truth_path, "8M", "--repeat", "3"), progress=lambda s: None)
    (t,) = load_json(truth_path)["files"]
    f = next(f for f in res.report["files"] if f["inode"] == t["inode"])
    assert f["folios_populated"] == t["folios"] == 3 * 2048


def test_update_policy_runs_no_population_program_outside_an_update(gmem, tmp_path):
    """serve's default: guest_memfd faults and fallocate outside an update
    pay nothing; the population programs never ran (no row, no window)."""
    truth_path = str(tmp_path / "truth.json")
    res = run(Options(mode="folio", handlers=["population"], population="update"), str(tmp_path / "p.luo"),
              command=populate_cmd(truth_path, "16M"), progress=lambda s: None)
    assert load_json(truth_path)["files"][0]["folios"] == 4096  # populated for real, while traced
    assert res.report["population"] == {"policy": "update", "windows_ns": []}
    assert res.report["files"] == []
    assert replay(str(tmp_path / "p.luo"))["population"] == res.report["population"]


def test_update_policy_attaches_population_for_the_update_and_still_sees_the_race(model, gmem, tmp_path):
    """A file enters an update (its preserve starts): the population
    tracepoints are attached then, so a folio added to the frozen file later
    is still caught; what was populated before is not counted (unknown)."""
    from tracer.live.model import run_model
    res, truth = run_model("folio", ["keep:gmem:1M:late_fallocate", "cancel:gmem:512K"], str(tmp_path / "m.luo"),
                           model=model, pause_ms=150, progress=lambda s: None, population="update")
    files = {f["inode"]: f for f in res.report["files"]}
    late, cancelled = (files[t["inode"]] for t in truth["files"])
    assert [a["code"] for a in late["anomalies"]] == ["folio_added_while_frozen"]
    assert late["anomalies"][0]["count"] == 1
    assert late["folios_populated"] is None and cancelled["folios_populated"] is None
    assert cancelled["result"] == "cancelled" and cancelled["anomalies"] == []
    pop = res.report["population"]
    assert pop["policy"] == "update" and len(pop["windows_ns"]) == 1
    on, off = pop["windows_ns"][0]
    preserve = next(p for p in late["phases"] if p["name"] == "preserve")
    assert preserve["start_ns"] < on < late["anomalies"][0]["time_ns"]  # attached after the preserve began
    assert off is None  # the kept file still waits for its kexec at the end: still attached
