"""`luotrace serve` as an always-on service: its state is bounded by the
files of the moment (finished files folded into counters, their BPF map
rows deleted), its counters stay exact and monotonic, and its HTTP side
answers a burst of connections and drops a client that sends nothing.
Timings are measured by `make bench` (tests/bench_soak.py), not here."""
from __future__ import annotations

import glob
import json
import signal
import socket
import subprocess
import time

import pytest

from tests.bench_soak import burst
from tests.conftest import LUOTRACE, REPO, load_json
from tests.test_prometheus import free_port, http_get, wait_for

KEEP = 3
RUN = ["kexec:gmem:256K,memfd:128K", "cancel:gmem:128K"]


def samples(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def map_entries(pid: int, name: str) -> int:
    """Entries of the BPF map NAME that process PID holds (its fdinfo, then bpftool)."""
    ids = set()
    for info in glob.glob(f"/proc/{pid}/fdinfo/*"):
        try:
            with open(info) as f:
                ids |= {int(ln.split()[1]) for ln in f if ln.startswith("map_id:")}
        except OSError:
            pass
    for map_id in sorted(ids):
        show = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)],
                                         capture_output=True, text=True).stdout or "{}")
        if show.get("name") == name:
            return len(json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                                                 capture_output=True, text=True, check=True).stdout))
    raise AssertionError(f"process {pid} holds no BPF map {name}")


@pytest.fixture
def service(model, gmem):
    port = free_port()
    p = subprocess.Popen(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{port}", "--model", model,
                                     "--keep-files", str(KEEP)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        while "metrics on" not in (line := p.stderr.readline()):  # printed once the probes are attached
            assert line, "serve exited early: " + p.stderr.read()
        wait_for(lambda: "luotrace_build_info" in http_get(url), 30, "serve to answer")
        yield p, url
    finally:
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "Traceback" not in err, err


def test_state_is_bounded_and_counters_stay_exact(service, model, tmp_path):
    """Twelve model runs (36 files): serve holds at most KEEP finished files
    plus the last run's, its BPF maps likewise, and every counter equals the
    sum of the model's ground truth after every run."""
    p, url = service
    want = {"guest_memfd": 0, "memfd": 0}
    files = 0
    for i in range(12):
        truth = tmp_path / f"t{i}.json"
        subprocess.run([model, "--json", str(truth), *RUN], check=True, capture_output=True)
        for f in load_json(str(truth))["files"]:
            want[f["handler"]] += f["folios_preserved"]
            files += 1
        time.sleep(0.6)  # past the shared snapshot's lifetime: this scrape sees the run
        m = samples(http_get(url))
        for h, n in want.items():
            assert m[f'luotrace_folios_preserved_total{{handler="{h}"}}'] == n, (i, h)
        assert sum(v for k, v in m.items() if k.startswith("luotrace_files_total{")) == files
        assert m["luotrace_files_tracked"] <= KEEP + len(RUN) + 1, m["luotrace_files_tracked"]
    assert map_entries(p.pid, "folio_stats") <= 2 * (KEEP + len(RUN) + 1)  # files and their ser handles


def test_a_burst_of_1000_connections_is_all_answered(service):
    _p, url = service
    assert burst(int(url.split(":")[2].split("/")[0]), 1000) == 1000


def test_a_client_that_sends_nothing_is_dropped_and_others_are_served(service):
    _p, url = service
    port = int(url.split(":")[2].split("/")[0])
    idle = socket.create_connection(("127.0.0.1", port))
    assert "luotrace_build_info" in http_get(url)  # served while the idle one waits
    idle.settimeout(30)
    t0 = time.monotonic()
    assert idle.recv(1) == b""  # closed by the server
    assert time.monotonic() - t0 < 25
