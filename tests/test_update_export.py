"""The old kernel's half of an update leaves it at kernel_kexec(): a textfile
that Debian's node_exporter serves and a push to Debian's Pushgateway, both
started by the test, both holding exactly the numbers of the report."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import LUOTRACE, REPO, load_json, need
from tests.test_prometheus import free_port, http_get, wait_for


def value(text: str, name: str, **labels: str) -> float:
    """The sample NAME{...} whose labels include LABELS."""
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"no {name}{labels} in:\n{text[:2000]}")


@pytest.fixture
def servers(tmp_path):
    for exe in ("prometheus-node-exporter", "prometheus-pushgateway"):
        need(shutil.which(exe) is not None, f"{exe} not installed (make setup installs it)")
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    nport, pport = free_port(), free_port()
    node = subprocess.Popen(["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{nport}",
                             "--collector.disable-defaults", "--collector.textfile",
                             f"--collector.textfile.directory={textdir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gw = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{pport}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{nport}/metrics"), 30, "node_exporter")
        wait_for(lambda: http_get(f"http://127.0.0.1:{pport}/metrics"), 30, "pushgateway")
        yield str(textdir), f"http://127.0.0.1:{nport}/metrics", f"http://127.0.0.1:{pport}"
    finally:
        for p in (node, gw):
            p.terminate()
            p.wait(30)


def test_the_old_kernels_numbers_leave_at_the_kexec(servers, model, kvm, tmp_path):
    textdir, node_url, gateway = servers
    truth = tmp_path / "truth.json"
    p = subprocess.Popen(LUOTRACE + ["record", "-o", str(tmp_path / "r.luo"), "--model", model, "--json",
                                     "--textfile-dir", textdir, "--pushgateway", gateway, "--",
                                     model, "--json", str(truth), "--pause-ms", "300", "kexec:gmem:1M,memfd:512K"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    at_kexec = {}
    while "pushed to" not in (line := p.stderr.readline()):  # the kexec's textfile, then its push
        assert line and "cannot" not in line, line + p.stderr.read()
        if "at the kexec written" in line:  # read while the model is still running, before the end rewrites it
            at_kexec["text"] = open(os.path.join(textdir, "luotrace.prom")).read()
            at_kexec["node"] = http_get(node_url)
    at_kexec["gateway"] = http_get(f"{gateway}/metrics")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "metrics at the end written" in err and "Traceback" not in err
    want = {t["handler"]: t["folios_preserved"] for t in load_json(str(truth))["files"]}
    assert want["guest_memfd"] == 256 and want["memfd"] == 128
    for h, n in want.items():
        assert value(at_kexec["text"], "luotrace_folios_preserved_total", handler=h) == n
        assert value(at_kexec["node"], "luotrace_folios_preserved_total", handler=h) == n
        assert value(at_kexec["gateway"], "luotrace_folios_preserved_total", handler=h, job="luotrace") == n
    # grouped by host and boot: a later boot's push does not replace this one
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert value(at_kexec["gateway"], "luotrace_folios_preserved_total", handler="memfd", boot_id=boot) == 128
    assert [f for f in os.listdir(textdir)] == ["luotrace.prom"]  # no temporary file left behind


def test_bad_export_targets_are_one_line_errors(tmp_path, model):
    r = subprocess.run(LUOTRACE + ["record", "-o", str(tmp_path / "r.luo"), "--model", model,
                                   "--textfile-dir", str(tmp_path / "nope"), "--", "true"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "is not a directory" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run(LUOTRACE + ["record", "-o", str(tmp_path / "r.luo"), "--model", model,
                                   "--pushgateway", "localhost:9091", "--", "true"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "bad --pushgateway" in r.stderr


def test_the_service_unit_installs_and_verifies(tmp_path):
    """`make install-service` renders the unit for this checkout and systemd-analyze verifies it."""
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze not installed")
    r = subprocess.run(["make", "-s", "-C", REPO, "install-service", f"SYSTEMD_DIR={tmp_path}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = (tmp_path / "luotrace.service").read_text()
    assert f"ExecStart={REPO}/.venv/bin/luotrace serve --listen 127.0.0.1:9477" in unit
    assert "@LUOTRACE_HOME@" not in unit and "ProtectSystem=strict" in unit
