"""Bad input gets one line on stderr, a non-zero exit and no traceback."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import MODEL, REPO, run_cli


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("luotrace: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "tracer.cli", *args]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_not_root(model):
    r = as_nobody("record", "-o", "/tmp/luotrace-nobody.luo", "--model", model, "--", "true")
    assert_one_line_error(r, "needs root", "sudo")


def test_no_btf(root, tmp_path):
    r = run_cli("record", "-o", str(tmp_path / "x.luo"), "--duration", "1",
                env=dict(os.environ, LUOTRACE_BTF=str(tmp_path / "missing-btf")))
    assert_one_line_error(r, "no kernel BTF", "CONFIG_DEBUG_INFO_BTF")


def test_unknown_mode(tmp_path):
    r = run_cli("record", "-o", str(tmp_path / "x.luo"), "--mode", "turbo", "--", "true")
    assert_one_line_error(r, "turbo", "--help")


def test_unknown_flag():
    r = run_cli("report", "--frobnicate", "x.luo")
    assert_one_line_error(r, "--frobnicate")


def test_model_path_missing(root, tmp_path):
    r = run_cli("record", "-o", str(tmp_path / "x.luo"), "--model", str(tmp_path / "no-model"), "--", "true")
    assert_one_line_error(r, "not found", "make model")


def test_kernel_without_luo_names_symbol_and_kernel(root, tmp_path):
    r = run_cli("record", "-o", str(tmp_path / "x.luo"), "--duration", "1")
    assert_one_line_error(r, "kvm_gmem_luo_preserve", os.uname().release, "--model")


def test_required_handler_missing_names_symbol(root, tmp_path):
    r = run_cli("record", "-o", str(tmp_path / "x.luo"), "--handler", "memfd", "--duration", "1")
    assert_one_line_error(r, "memfd_luo_preserve", os.uname().release)


def test_not_a_recording(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, this is not a recording\n")
    assert_one_line_error(run_cli("report", str(p)), "not a luotrace recording")


def test_missing_recording(tmp_path):
    assert_one_line_error(run_cli("report", str(tmp_path / "nope.luo")), "cannot read")


def test_bad_label(model, tmp_path):
    r = run_cli("record", "-o", str(tmp_path / "x.luo"), "--model", model, "--label", "oops", "--", "true")
    assert_one_line_error(r, "--label")


def test_bad_ringbuf_size(model, tmp_path):
    for flag in ("--folio-ringbuf-pages", "--ringbuf-pages", "--lifecycle-ringbuf-pages"):  # --ringbuf-pages: old name
        r = run_cli("record", "-o", str(tmp_path / "x.luo"), "--model", model, flag, "3", "--", "true")
        assert_one_line_error(r, "power of two")
        assert ("--lifecycle" in r.stderr) == (flag == "--lifecycle-ringbuf-pages"), r.stderr


def test_doctor_as_root_passes_and_explains(gmem):
    from tracer.kernel.kvm import probe
    r = run_cli("doctor", "--model", MODEL)
    assert r.returncode == 0, r.stderr
    # the capability probe's answer, in one line, whatever this host's KVM can do
    line = next(ln for ln in r.stdout.splitlines() if " guest_memfd: " in ln)
    assert line.startswith("ok   " if probe().ok else "no   ") and probe().why in line
    assert ("stand-ins" in line) == gmem.standin
    assert "kvm_gmem_luo_preserve [required]: missing" in r.stdout
    assert "model: kho_preserve_folio [required]: ok" not in r.stdout
    assert "ok   model: kho_preserve_folio [required]: uprobe" in r.stdout
    assert "ok   kernel: filemap:mm_filemap_add_to_page_cache: tracepoint" in r.stdout


def test_doctor_not_root_fails(root):  # root, to drop to nobody
    r = as_nobody("doctor")
    assert r.returncode != 0
    assert "FAIL root" in r.stdout
    assert "Traceback" not in r.stderr


def test_help_explains_every_command():
    r = run_cli("--help", check=True)
    for cmd in ("doctor", "record", "report", "demo", "serve", "export", "timeline", "compare", "simulate"):
        assert cmd in r.stdout
        sub = run_cli(cmd, "--help", check=True)
        assert "Example" in sub.stdout, cmd


def test_record_report_roundtrip_json(model, tmp_path):
    out = str(tmp_path / "r.luo")
    r = run_cli("record", "-o", out, "--model", model, "--mode", "light", "--label", "patch=v3", "--json", "--",
                model, "--json", str(tmp_path / "truth.json"), "kexec:gmem:1M")
    assert r.returncode == 0, r.stderr
    n = sum(1 for p in json.loads(r.stdout)["probes"] if p["status"] == "attached")
    assert re.search(rf"draining and detaching {n} probes\.\.\.\n(.*\n)*?luotrace: {n} probes detached in \d+\.\d s",
                     r.stderr), r.stderr
    live = json.loads(r.stdout)
    again = json.loads(run_cli("report", out, "--json", check=True).stdout)
    assert live == again
    assert live["schema"] == "luotrace.report/1"
    assert live["recording"]["labels"] == {"patch": "v3"}
    (f,) = live["files"]
    assert f["folios_preserved"] == 256 and f["result"] == "retrieved"
    text = run_cli("report", out, check=True).stdout
    assert "guest_memfd" in text and "retrieved" in text and "patch=v3" in text
    lines = [json.loads(ln) for ln in run_cli("report", out, "--events", check=True).stdout.splitlines()]
    assert len(lines) == live["events"]["received"]
    pres = [e for e in lines if e["probe"] == "gmem_preserve"]
    assert [e["kind"] for e in pres] == ["entry", "return"]
    assert pres[0]["size"] == 1 << 20 and pres[1]["duration_ns"] > 0 and pres[1]["ret"] == 0


def test_truncated_recording_reports_with_a_warning(model, tmp_path):
    out = str(tmp_path / "r.luo")
    run_cli("record", "-o", out, "--model", model, "--quiet", "--", model, "--json", str(tmp_path / "t.json"),
            "keep:gmem:1M", check=True)
    data = open(out, "rb").read()
    cut = tmp_path / "cut.luo"
    cut.write_bytes(data[: len(data) - 100])
    r = run_cli("report", str(cut))
    assert r.returncode == 0 and "WARNING: recording truncated" in r.stdout
    assert r.stderr.count("\n") == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr
    head = tmp_path / "head.luo"
    head.write_bytes(data[:30])
    assert_one_line_error(run_cli("report", str(head)), "header cut short")


def test_demo_shows_report_and_metrics_and_agrees_with_the_model(model, gmem, tmp_path):
    """On this host's own guest_memfd files: real ones, or stand-ins said as such."""
    r = run_cli("demo", "-o", str(tmp_path / "demo.luo"))
    assert r.returncode == 0, r.stderr
    assert "all 4 files agree" in r.stderr
    assert "luotrace report" in r.stdout and "error EHWPOISON" in r.stdout and "cancelled" in r.stdout
    assert 'luotrace_preserve_errors_total{errno="EHWPOISON",handler="guest_memfd"} 1.0' in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    if gmem.standin:
        assert f"on guest_memfd STAND-INS (ramfs page-cache files: {gmem.why})" in last
        assert "guest_memfd files: STAND-INS (ramfs page-cache files, dev " in r.stdout
        assert 'gmem="standin"' in r.stdout
    else:
        assert "on real guest_memfds" in last and "STAND-IN" not in r.stdout
        assert 'gmem="guest_memfd"' in r.stdout


def test_demo_on_forced_stand_ins_agrees_and_says_so(model, gmem, tmp_path):
    """The stand-in path, on every host (even where real guest_memfds work):
    the same files agree with the model, and every output says stand-ins."""
    out = str(tmp_path / "demo.luo")
    r = run_cli("demo", "-o", out, "--gmem", "standin", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["gmem"]["backing"] == "standin" and rep["gmem"]["why"].startswith("forced by --gmem")
    assert rep["gmem"]["not_checked"] == {"large_folios": rep["gmem"]["not_checked"]["large_folios"]}
    assert rep["population"] and rep["gmem"]["dev"] == os.stat("/run/luotrace/gmem-standin").st_dev
    gm = [f for f in rep["files"] if f["handler"] == "guest_memfd"]
    assert len(gm) == 3 and all(f["dev"] == rep["gmem"]["dev"] for f in gm)
    assert all("large_folios" in f["anomalies_not_checked"] for f in gm)
    assert [f["folios_populated"] for f in gm] == [4096, 2048, 2048]  # the filemap tracepoints on the stand-ins
    assert "all 4 files agree, on guest_memfd STAND-INS (ramfs page-cache files: forced by --gmem" in r.stderr
    r = run_cli("report", out)
    assert "guest_memfd files: STAND-INS" in r.stdout and "not checked on the stand-in guest_memfd files" in r.stdout
    prom = tmp_path / "demo.prom"
    run_cli("export", out, "--textfile", str(prom), check=True)
    assert 'gmem="standin"' in prom.read_text()


def test_print_bpf_shows_final_text_with_resolved_offsets(model):
    r = run_cli("record", "-o", "/dev/null", "--model", model, "--print-bpf", check=True)
    assert "-DLUO_USER=1" in r.stdout and "-DOFF_ARGS_FILE=16" in r.stdout
    # folio mode reads the folio arrays a page at a time; --folio-latency runs a program per folio instead
    assert "int kho_vmalloc_page_entry(struct pt_regs *ctx)" in r.stdout and "-DFOLIO_ARRAY=1" in r.stdout
    assert "int kho_preserve_folio_entry(struct pt_regs *ctx)" not in r.stdout
    r = run_cli("record", "-o", "/dev/null", "--model", model, "--folio-latency", "--print-bpf", check=True)
    assert "int kho_preserve_folio_entry(struct pt_regs *ctx)" in r.stdout
    assert "int kho_vmalloc_page_entry(" not in r.stdout and "-DFOLIO_ARRAY" not in r.stdout


NUMBERS = [  # every numeric option: finite, in range, fitting the kernel's or numpy's type
    (["record", "-o", "{tmp}/x.luo", "--duration", "nan", "--", "true"], "'nan' is not a number"),
    (["record", "-o", "{tmp}/x.luo", "--duration", "inf", "--", "true"], "--duration"),
    (["record", "-o", "{tmp}/x.luo", "--folio-ringbuf-pages", "1048576", "--", "true"], "--folio-ringbuf-pages"),
    (["record", "-o", "{tmp}/x.luo", "--lifecycle-ringbuf-pages", "0", "--", "true"], "--lifecycle-ringbuf-pages"),
    (["record", "-o", "{tmp}/x.luo", "--sample", str(2**40), "--", "true"], "--sample"),
    (["serve", "--duration", "nan"], "'nan' is not a number"),
    (["simulate", "-o", "{tmp}/s.luo", "--folio-ns", "inf"], "--folio-ns"),
    (["simulate", "-o", "{tmp}/s.luo", "--folio-ns", "1e300"], "--folio-ns"),
    (["simulate", "-o", "{tmp}/s.luo", "--slow", "fill_pass=nan"], "--slow"),
    (["simulate", "-o", "{tmp}/s.luo", "--slow", "fill_pass=-1"], "--slow"),
    (["simulate", "-o", "{tmp}/s.luo", "--slow", "nophase=2"], "unknown phase 'nophase'"),
    (["simulate", "-o", "{tmp}/s.luo", "--seed", "-1"], "--seed"),
    (["compare", "{tmp}/a.luo", "{tmp}/b.luo", "--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("args, says", NUMBERS, ids=[" ".join(a[:3] + a[-2:]) for a, _ in NUMBERS])
def test_numeric_options_are_checked_before_any_work(args, says, tmp_path):
    r = run_cli(*[a.format(tmp=tmp_path) for a in args], timeout=60)
    assert_one_line_error(r, says)
    assert not os.path.exists(tmp_path / "s.luo") and not os.path.exists(tmp_path / "x.luo")


def test_report_fail_on_gates_ci(tmp_path):
    """--fail-on: exit 3 and one line naming what failed; 0 when clean; 2 for an unknown kind."""
    bad, good = str(tmp_path / "bad.luo"), str(tmp_path / "good.luo")
    run_cli("simulate", "-o", bad, "--errors", "1", "--anomaly", "pfn_zero", "--lost", "5", check=True)
    run_cli("simulate", "-o", good, check=True)
    for kind, says in (("error", "1 file(s) failed (EHWPOISON)"), ("anomaly", "1 anomaly (pfn_zero)"),
                       ("lost", "5 event(s) lost")):
        r = run_cli("report", bad, "--fail-on", kind)
        assert r.returncode == 3 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "luotrace report" in r.stdout  # the report is still printed
        assert run_cli("report", good, "--fail-on", kind).returncode == 0
    r = run_cli("report", bad, "--fail-on", "errors")
    assert r.returncode == 2 and "unknown errors" in r.stderr


def test_record_json_stdout_is_json_alone_and_fail_on(model, gmem, tmp_path):
    r = run_cli("record", "-o", str(tmp_path / "r.luo"), "--model", model, "--json", "--fail-on", "anomaly", "--",
                model, "keep:gmem:1M:holes=3")
    rep = json.loads(r.stdout)  # the model's own output went to stderr
    assert rep["totals"]["anomalies"].get("holes") == 1
    assert r.returncode == 3 and "1 anomaly (holes)" in r.stderr


def test_doctor_ends_with_a_verdict(root, model):
    r = run_cli("doctor", "--model", model)
    assert r.returncode == 0 and "ok   verdict (model): luotrace can trace this model: guest_memfd, memfd" in r.stdout
    with open("/proc/kallsyms") as f:
        luo = any(line.split()[2] == "memfd_luo_preserve" for line in f if len(line.split()) > 2)
    r = run_cli("doctor")
    if luo:
        assert r.returncode == 0 and "ok   verdict (kernel)" in r.stdout
    else:  # this host's kernel has no LUO: doctor says so and fails
        assert r.returncode == 1 and "FAIL verdict (kernel): luotrace cannot trace this kernel" in r.stdout
