"""The traced command is never harmed and outputs never clobber what they must
not: on the real paths (a small tmpfs that fills up, a device node made with
mknod, a held lock, real signals while the probes compile)."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import LUOTRACE, REPO, load_json, run_cli, wait_tracing


@pytest.fixture
def small_fs(tmp_path, root):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_ends_the_recording_not_the_command(small_fs, tmp_path, model, gmem):
    """trace mode streams a 64-byte record per folio: 16,384 folios do not fit in 192 KiB."""
    truth = tmp_path / "truth.json"
    out = small_fs / "r.luo"
    r = run_cli("record", "--mode", "trace", "--model", model, "-o", str(out), "--json", "--",
                model, "--json", str(truth), "cancel:gmem:64M")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    t = load_json(str(truth))  # the command ran to its end and wrote its truth
    assert t["files"][0]["folios_preserved"] == 16384
    line = [ln for ln in r.stderr.splitlines() if "is incomplete" in ln]
    assert len(line) == 1 and "No space left on device" in line[0], r.stderr
    rep = json.loads(r.stdout)  # the report is whole: from BPF maps and every event received
    assert rep["files"][0]["folios_preserved"] == 16384 and rep["events"]["lost"] == 0
    again = run_cli("report", "--json", str(out))  # what reached the disk reads, marked truncated
    assert again.returncode == 0 and json.loads(again.stdout)["truncated"]


def test_existing_output_needs_force(tmp_path, model):
    out = tmp_path / "r.luo"
    out.write_text("precious")
    r = run_cli("record", "--model", model, "-o", str(out), "--", "true")
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_text() == "precious"
    r = run_cli("record", "--model", model, "-o", str(out), "--force", "--quiet", "--", "true")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().startswith(b"LUOTRACE")


def test_device_nodes_are_never_written_or_replaced(tmp_path, model):
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    r = run_cli("record", "--model", model, "-o", str(dev), "--force", "--", "true")
    assert r.returncode == 1 and "not a regular file" in r.stderr
    rec = tmp_path / "ok.luo"
    run_cli("simulate", "--files", "1", "--size", "4M", "-o", str(rec), check=True)
    r = run_cli("export", str(rec), "--textfile", str(dev))
    assert r.returncode == 1 and "not a regular file" in r.stderr
    assert stat.S_ISCHR(os.stat(dev).st_mode)  # still the device it was


def test_the_recording_may_not_be_the_traced_command(tmp_path, model):
    script = tmp_path / "step.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    r = run_cli("record", "--model", model, "--force", "-o", str(script), "--", str(script))
    assert r.returncode == 1 and "which the traced command uses" in r.stderr
    assert script.read_text() == "#!/bin/sh\nexit 0\n"


def test_a_file_another_luotrace_writes_is_refused(tmp_path, model):
    out = tmp_path / "r.luo"
    with open(out, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # what a running recorder holds
        r = run_cli("record", "--model", model, "-o", str(out), "--force", "--", "true")
    assert r.returncode == 1 and "another luotrace is writing" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_a_signal_before_attach_cancels_before_the_command_starts(tmp_path, model, sig):
    marker = tmp_path / "ran"
    out = tmp_path / "r.luo"
    p = subprocess.Popen(LUOTRACE + ["record", "--model", model, "-o", str(out), "--quiet", "--",
                                     "sh", "-c", f"touch {marker}"],
                         cwd=REPO, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert "compiling" in line, line  # the handlers are in place, the probes not yet attached
    p.send_signal(sig)
    err = line + p.stderr.read()
    p.wait(120)
    assert "before tracing started; the command was not run" in err, err
    assert "Traceback" not in err and not marker.exists()
    assert not json.loads(run_cli("report", "--json", str(out), check=True).stdout)["truncated"]  # closed cleanly


def test_sighup_during_the_run_stops_it_cleanly_and_the_command_gets_sigterm(tmp_path, model):
    out = tmp_path / "r.luo"
    p = subprocess.Popen(LUOTRACE + ["record", "--model", model, "-o", str(out), "--quiet", "--",
                                     sys.executable, "-c", "import signal,sys,time\n"
                                     "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\ntime.sleep(60)"],
                         cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_tracing(p)
    time.sleep(0.5)
    p.send_signal(signal.SIGHUP)
    err = p.stderr.read()
    p.wait(60)
    assert "(SIGHUP)" in err and "Traceback" not in err
    assert not json.loads(run_cli("report", "--json", str(out), check=True).stdout)["truncated"]


def test_timeline_and_plot_write_exactly_their_path_and_never_a_device(root, tmp_path):  # root: mknod
    a, b = tmp_path / "a.luo", tmp_path / "b.luo"
    run_cli("simulate", "--files", "2", "--size", "8M", "--seed", "1", "-o", str(a), check=True)
    run_cli("simulate", "--files", "2", "--size", "8M", "--seed", "2", "-o", str(b), check=True)
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for args in (["timeline", str(a), "-o", str(dev)], ["compare", str(a), str(b), "--plot", str(dev)]):
        r = run_cli(*args)
        assert r.returncode == 1 and "not a regular file" in r.stderr, r.stderr
    assert stat.S_ISCHR(os.stat(dev).st_mode)
    plot = tmp_path / "p"  # no extension: written as named, not as p.png
    r = run_cli("compare", str(a), str(b), "--plot", str(plot))
    assert r.returncode == 0 and plot.read_bytes().startswith(b"\x89PNG") and not (tmp_path / "p.png").exists()
    assert f"plot written to {plot}" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["a.luo", "b.luo", "null", "p"]  # no temporary file left


def test_a_simulation_the_disk_cannot_hold_is_refused_or_leaves_no_partial_file(small_fs, tmp_path):
    # known too big for the disk: refused before a byte is written
    r = run_cli("simulate", "--mode", "trace", "--size", "1G", "-o", str(small_fs / "big.luo"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "about 16.1 MiB (262222 records" in r.stderr and "free" in r.stderr, r.stderr
    assert list(small_fs.iterdir()) == []
    # room gone while writing (here a 64 KiB file-size limit: the write fails
    # half-way, as on a disk another writer filled): the partial file goes
    cmd = ["prlimit", "--fsize=65536", sys.executable, "-m", "tracer.cli", "simulate", "--mode", "trace",
           "--size", "64M", "-o", str(tmp_path / "cut.luo")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "File too large" in r.stderr and "removed" in r.stderr, r.stderr
    assert not (tmp_path / "cut.luo").exists()


def test_fifo_and_device_inputs_are_refused_at_once(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    for args in (["report", str(fifo)], ["timeline", str(fifo), "-o", str(tmp_path / "t.json")],
                 ["compare", str(fifo), str(fifo)], ["report", "/dev/zero"]):
        r = run_cli(*args, timeout=20)  # a FIFO opened for reading would wait for a writer forever
        assert r.returncode == 1 and "is not a regular file" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_model_that_is_not_the_model_is_refused(tmp_path, root):
    """doctor names every probe a non-ELF or foreign binary cannot give; record refuses it."""
    fake = tmp_path / "passwd"
    fake.write_text(open("/etc/passwd").read())
    fake.chmod(0o755)
    r = run_cli("doctor", "--model", str(fake))
    model_lines = [ln for ln in r.stdout.splitlines() if " model: " in ln and "tracepoint" not in ln
                   and "verdict" not in ln]
    assert model_lines and all(ln.startswith("no ") and "not in the symbol table" in ln for ln in model_lines)
    assert r.returncode == 1 and "FAIL verdict (model): luotrace cannot trace this model" in r.stdout
    r = run_cli("record", "--model", str(fake), "-o", str(tmp_path / "r.luo"), "--", "true")
    assert r.returncode == 1 and "is not an ELF executable" in r.stderr


def test_exit_status_of_a_command_killed_by_a_signal_is_the_shells(tmp_path, model):
    r = run_cli("record", "--model", model, "--quiet", "-o", str(tmp_path / "r.luo"), "--", "sh", "-c", "kill -SEGV $$")
    assert r.returncode == 128 + signal.SIGSEGV and "killed by SIGSEGV" in r.stderr
    r = run_cli("record", "--model", model, "--quiet", "-o", str(tmp_path / "s.luo"), "--", "sh", "-c", "exit 7")
    assert r.returncode == 7


def test_labels_must_be_printable_and_prometheus_names(tmp_path):
    for bad in ("a b=1", "x=line\nbreak", "1x=v", "x=" + "v" * 300):
        r = run_cli("simulate", "-o", str(tmp_path / "s.luo"), "--label", bad)
        assert r.returncode == 1 and "bad --label" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run_cli("simulate", "-o", str(tmp_path / "s.luo"), "--label", "patch=v3-rc1 (rebased)")
    assert r.returncode == 0, r.stderr
