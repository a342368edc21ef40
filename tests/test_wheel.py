"""`pip install .` into a fresh venv (with the system's site packages, for
BCC) gives a luotrace that works away from the checkout: the BPF programs
ship as package data, the reference model is built from its shipped source,
and record (through demo), report, compare, simulate and serve all run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

from tests.conftest import REPO, need
from tests.test_prometheus import free_port, http_get, wait_for


def test_a_wheel_installed_in_a_fresh_venv_records_reports_and_serves(root, gmem, tmp_path):
    need(shutil.which("rsync") is not None, "rsync not installed")
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    # a copy of the working tree: building must not write into the checkout
    subprocess.run(["rsync", "-a", "--exclude", "/.venv", "--exclude", "/.git", "--exclude", "*.egg-info",
                    "--exclude", "/build", "--exclude", "__pycache__", "--exclude", "/workloads/model/luo_model",
                    f"{REPO}/", f"{src}/"], check=True)
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(src)  # nothing may still point into the source tree
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    exe = str(venv / "bin" / "luotrace")

    def lt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([exe, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert not check or r.returncode == 0, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import tracer, tracer.probes.program as l; "
                            "print(tracer.__file__); print(l.bpf_dir())"], cwd=work, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where  # the installed package, its own BPF

    demo = lt("demo", "-o", "demo.luo")  # builds the model from the wheel's source, traces it with BPF
    assert "checked against the model's ground truth: all" in demo.stderr, demo.stderr
    assert any(n.startswith("luo_model-") for n in os.listdir(tmp_path / "cache" / "luotrace"))
    rep = json.loads(lt("report", "--json", "demo.luo").stdout)
    assert rep["files"] and all(f["result"] for f in rep["files"])

    lt("simulate", "--files", "4", "--size", "64M", "-o", "a.luo")
    lt("simulate", "--files", "4", "--size", "64M", "--slow", "fill_pass=1.5", "--seed", "1", "-o", "b.luo")
    cmp = json.loads(lt("compare", "--json", "a.luo", "b.luo").stdout)
    assert cmp["phases"]

    port = free_port()
    srv = subprocess.Popen([exe, "serve", "--replay", "demo.luo", "--listen", f"127.0.0.1:{port}"], cwd=work, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        body = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/metrics"), 30, "serve --replay")
        assert "luotrace_folios_preserved_total" in body
    finally:
        srv.terminate()
        srv.wait(30)
