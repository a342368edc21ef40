"""SIGINT and SIGTERM during `record`: probes detached (no program of ours
left attached, nor loaded unless the BPF cache keeps it for the next start),
the recording readable, the report printed.  Lost events are counted and shown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import LUOTRACE, REPO, need, run_cli, wait_tracing
from tracer.analysis.replay import replay


def bpf_prog_ids():
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def perf_links():
    out = subprocess.run(["bpftool", "perf", "-j"], capture_output=True, text=True).stdout
    return json.loads(out or "[]")


def attached_prog_ids():
    """Programs attached to anything: through perf events (uprobes, kprobes,
    tracepoints) or BPF links (fentry)."""
    links = subprocess.run(["bpftool", "link", "show", "-j"], capture_output=True, text=True).stdout
    return {x.get("prog_id") for x in perf_links() + json.loads(links or "[]")}


def kept_prog_ids():
    """Programs the BPF cache keeps loaded between starts (pinned under
    /sys/fs/bpf/luotrace, tracer/attach/bpf_cache.py)."""
    out = subprocess.run(["bpftool", "-f", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")
            if any(x.startswith("/sys/fs/bpf/luotrace/") for x in p.get("pinned", []))}


def attached_by(pid: int):
    """The programs process PID attached through perf events."""
    return {x["prog_id"] for x in perf_links() if x.get("pid") == pid}


def left_behind(ours):
    """Of OURS, the programs still attached, or loaded without being kept."""
    return (bpf_prog_ids() & ours) - kept_prog_ids() | (attached_prog_ids() & ours)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_detaches_and_keeps_the_recording(sig, model, gmem, tmp_path):
    out = str(tmp_path / "sig.luo")
    cmd = LUOTRACE + ["record", "-o", out, "--model", model, "--", model, "--json", str(tmp_path / "t.json"),
                      "--pause-ms", "150"] + ["kexec:gmem:1M"] * 8
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_tracing(p)
    time.sleep(1.5)
    during = attached_by(p.pid)  # loaded now, or kept loaded by an earlier start and attached now
    assert during, "no program attached while tracing"
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "detaching" in stderr
    assert f"({sig.name})" in stderr
    # nothing of ours is left attached, nor loaded unless the BPF cache keeps it
    assert not left_behind(during)
    assert not [link for link in perf_links() if link.get("pid") == p.pid]
    with open("/sys/kernel/debug/tracing/uprobe_events") as f:
        assert "luo_model" not in f.read()
    # the report was printed and the recording replays to the same files
    assert "luotrace report" in stdout
    rep = replay(out)
    assert not rep["truncated"]
    assert rep["files"], "events recorded before the signal must be kept"
    assert sum(1 for f in rep["files"] if f["result"] == "retrieved") < 8  # stopped midway


def test_lost_events_counted_and_shown(model, gmem, tmp_path):
    """The consumer stalls (SIGSTOP) while the model preserves 4096 folios in
    trace mode with a one-page per-folio ring buffer: the overflow is counted
    in BPF and shown; lifecycle events, in their own buffer, are all kept and
    the per-file counters from the maps stay exact."""
    out = str(tmp_path / "lost.luo")
    truth_path = str(tmp_path / "truth.json")
    cmd = LUOTRACE + ["record", "-o", out, "--mode", "trace", "--ringbuf-pages", "1", "--model", model, "--json",
                      "--", model, "--json", truth_path, "--pause-ms", "700", "keep:gmem:16M"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_tracing(p)
    time.sleep(0.2)
    os.kill(p.pid, signal.SIGSTOP)
    time.sleep(2.5)  # the fill pass runs while nobody reads the ring buffer
    os.kill(p.pid, signal.SIGCONT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    report = json.loads(stdout)
    ev = report["events"]
    assert ev["lost"] > 0 and ev["lost"] == ev["lost_per_folio"]
    assert ev["lost_lifecycle"] == 0
    truth = json.load(open(truth_path))
    (f,) = report["files"]
    assert f["result"] == "ok"
    assert f["folios_preserved"] == truth["files"][0]["folios_preserved"] == 4096
    assert f["streamed_events"]["kho_preserve_folio"] + ev["lost"] == 4096
    from exporters.text import render
    assert f"{ev['lost']} lost" in render(report)
    assert replay(out) == report


def test_sigkill_leaves_a_readable_recording(model, gmem, tmp_path):
    """SIGKILL cannot be caught: the recording has no trailer, but every
    record flushed before the kill is recovered and the report says so."""
    out = str(tmp_path / "killed.luo")
    cmd = LUOTRACE + ["record", "-o", out, "--model", model, "--", model, "--json", str(tmp_path / "t.json"),
                      "--pause-ms", "200"] + ["kexec:gmem:1M"] * 10
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_tracing(p)
    # wait until blocks of events reached the file (flushed at least every second)
    from tracer.recording import format as rec
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(0.3)
        try:
            if len(rec.read(out).events) >= 20:
                break
        except Exception:
            pass
    p.kill()
    p.communicate(timeout=30)
    rep = replay(out)
    assert rep["truncated"] and "not closed" in rep["truncated_reason"]
    assert rep["events"]["received"] > 0 and rep["files"]
    # the kernel dropped our programs with the process
    r = subprocess.run(LUOTRACE + ["report", out], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "WARNING: recording truncated" in r.stdout


def _sysctl() -> str:
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        return f.read().strip()


def _preserve_runs(rep: dict) -> int:
    return rep["bpf"]["programs"]["gmem_preserve_entry"]["run_cnt"]


def test_bpf_stats_are_per_process_sigkill_leaves_nothing(model, gmem, tmp_path):
    """Run-time statistics come from a BPF_ENABLE_STATS fd, never the sysctl:
    a SIGKILLed recorder leaves kernel.bpf_stats_enabled as it was."""
    need(_sysctl() == "0", "kernel.bpf_stats_enabled is already 1 here: nothing to observe")
    out = str(tmp_path / "k.luo")
    p = subprocess.Popen(LUOTRACE + ["record", "-o", out, "--model", model, "--", model, "--pause-ms", "200"]
                         + ["kexec:gmem:1M"] * 20, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_tracing(p)
    assert _sysctl() == "0"  # never written (its read side shows only what was written)
    p.kill()
    p.communicate(timeout=30)
    assert _sysctl() == "0"
    rep = replay(out)  # what was recorded before the kill still reads
    assert rep["truncated"]


def test_one_recorder_ending_does_not_stop_anothers_statistics(model, gmem, tmp_path):
    """A records for a while; B records one model run and ends; a second
    model run after B ended is still counted in A's BPF statistics, with the
    sysctl at 0 all along."""
    need(_sysctl() == "0", "kernel.bpf_stats_enabled is already 1 here: nothing to observe")
    a = subprocess.Popen(LUOTRACE + ["record", "-o", str(tmp_path / "a.luo"), "--model", model, "--duration", "60",
                                     "--json"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_tracing(a)
    run_cli("record", "-o", str(tmp_path / "b.luo"), "--model", model, "--quiet", "--", model, "kexec:gmem:1M",
            check=True)
    subprocess.run([model, "kexec:gmem:1M", "kexec:gmem:1M"], check=True, capture_output=True)
    a.send_signal(signal.SIGINT)
    stdout, stderr = a.communicate(timeout=60)
    rep_a, rep_b = json.loads(stdout), replay(str(tmp_path / "b.luo"))
    assert rep_b["bpf"]["stats_enabled"] and _preserve_runs(rep_b) == 1
    assert rep_a["bpf"]["stats_enabled"] and _preserve_runs(rep_a) == 3
    assert rep_a["bpf"]["programs"]["gmem_preserve_entry"]["run_time_ns"] > 0
    assert _sysctl() == "0"


@pytest.mark.parametrize("when", ["compiling", "detaching"])
def test_a_second_ctrl_c_quits_at_once(when, model, gmem, tmp_path):
    """Compiling (one long C call) or detaching (uprobes wait for grace
    periods in the kernel), a second SIGINT ends the process at once, not
    after the compile or the detach (5-12 s and 2.7 s before); the probes
    it leaves are released as it goes."""
    p = subprocess.Popen(LUOTRACE + ["record", "--model", model, "-o", str(tmp_path / "q.luo"), "--", "sleep", "60"],
                         cwd=REPO, stderr=subprocess.PIPE, text=True, env=dict(os.environ, LUOTRACE_BPF_CACHE="0"))
    if when == "compiling":
        while "compiling" not in (line := p.stderr.readline()):
            assert line, "record ended early"
        time.sleep(0.3)
    else:
        wait_tracing(p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.2)
    t = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.wait(30)
    assert time.monotonic() - t < 1.5 and p.returncode == 130
    assert "quitting" in p.stderr.read()
    def on_model():
        return [x for x in perf_links() if x.get("filename") == model]
    deadline = time.monotonic() + 30
    while on_model() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not on_model()
