"""The old kernel's half of an update leaves it at kernel_kexec(): a textfile
that Debian's node_exporter serves, a push to Debian's Pushgateway and the
recording in serve's state directory, read again after the boot; all started
by the test, all holding exactly the numbers of the report, and all reaching
a real Prometheus that scrapes every 15 s."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import LUOTRACE, REPO, load_json, need, run_cli, wait_tracing
from tests.test_prometheus import Prom, free_port, http_get, wait_for


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


def test_the_old_kernels_numbers_leave_at_the_kexec(servers, model, gmem, tmp_path):
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


def test_the_service_unit_installs_and_verifies(root, tmp_path):  # root: make venv, /var/lib
    """`make install-service` renders the unit for this checkout and systemd-analyze verifies it."""
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze not installed")
    r = subprocess.run(["make", "-s", "-C", REPO, "install-service", f"SYSTEMD_DIR={tmp_path}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = (tmp_path / "luotrace.service").read_text()
    assert f"ExecStart={REPO}/.venv/bin/luotrace serve --listen 127.0.0.1:9477" in unit
    assert "@LUOTRACE_HOME@" not in unit and "ProtectSystem=strict" in unit


def _as_after_a_boot(cmd: list, tmp_path) -> list:
    """CMD in a mount namespace whose /proc/sys/kernel/random/boot_id reads
    a new id: what luotrace sees after a kexec, without one."""
    fake = tmp_path / "next_boot_id"
    fake.write_text("0b0b0b0b-1111-4222-8333-444444444444\n")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind {fake} /proc/sys/kernel/random/boot_id && exec "$@"', "sh"] + cmd


def test_an_update_reaches_prometheus_at_15s_through_each_path(servers, model, gmem, tmp_path):
    """A model update of under 2 s, traced by serve with a state directory,
    the textfile collector and the Pushgateway; serve killed right after the
    kexec (as the jump would), started again as after a boot.  Prometheus
    scrapes every 15 s and still holds the update's exact folio counts,
    through each of the three paths."""
    textdir, node_url, gateway = servers
    state, lport, pport = tmp_path / "state", free_port(), free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""
global: {{scrape_interval: 15s, evaluation_interval: 15s}}
scrape_configs:
  - {{job_name: luotrace, static_configs: [{{targets: ["127.0.0.1:{lport}"]}}]}}
  - {{job_name: node, static_configs: [{{targets: ["{node_url[len('http://'):-len('/metrics')]}"]}}]}}
  - {{job_name: pushgateway, static_configs: [{{targets: ["{gateway[len('http://'):]}"]}}]}}
""")
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = [*LUOTRACE, "serve", "--listen", f"127.0.0.1:{lport}", "--model", model, "--state-dir", str(state)]
    first = subprocess.Popen(serve + ["--textfile-dir", textdir, "--pushgateway", gateway],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        p = Prom(f"http://127.0.0.1:{pport}")
        wait_tracing(first)
        truth = tmp_path / "truth.json"
        t0 = time.monotonic()
        subprocess.run([model, "--json", str(truth), "kexec:gmem:1M,memfd:512K"], check=True, timeout=60)
        took = time.monotonic() - t0
        while "pushed to" not in (line := first.stderr.readline()):  # the textfile, then the push, at the kexec
            assert line and "cannot" not in line, line + first.stderr.read()
        first.kill()  # the jump: no clean end, no "at the end" export
        first.wait(30)
        assert took < 2, took
        old_boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        [recording] = [str(state / f) for f in os.listdir(state)]
        report = json.loads(run_cli("report", "--json", recording, check=True).stdout)
        want = {"guest_memfd": 256, "memfd": 128}
        assert {h: sum(f["folios_preserved"] or 0 for f in report["files"] if f["handler"] == h)
                for h in want} == want == {t["handler"]: t["folios_preserved"] for t in load_json(truth)["files"]}

        second = subprocess.Popen(_as_after_a_boot(serve, tmp_path), cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while "exporting the update" not in (line := second.stderr.readline()):
            assert line, "serve after the boot: " + second.stderr.read()
        assert f"ended boot {old_boot}" in line and "384 folios preserved" in line, line

        paths = {"state directory": f'job="luotrace",boot_id="{old_boot}"',
                 "textfile": 'job="node"', "pushgateway": f'job="pushgateway",exported_job="luotrace",boot_id="{old_boot}"'}
        for path, sel in paths.items():
            for h, n in want.items():
                q = f'luotrace_folios_preserved_total{{{sel},handler="{h}"}}'
                wait_for(lambda: p.query(q), 60, f"{path}: {q}")
                assert p.value(q) == n, (path, q)
        # the next boot's own series are live beside the old one's, without a boot_id label
        assert p.value('luotrace_folios_preserved_total{job="luotrace",handler="memfd",boot_id=""}') == 0
        # this boot's recording beside the previous one (its writer opens once the probes are attached,
        # which may come after the scrapes above)
        wait_for(lambda: len(os.listdir(state)) == 2, 60, "this boot's recording in the state directory")
    finally:
        for proc in (first, second, prom):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
