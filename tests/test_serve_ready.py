"""`luotrace serve` says when it is watching: /-/ready is 503 (with why)
until every selected probe is attached and the first poll ran, then 200;
luotrace_tracing goes 0 -> 1 with it; systemd hears READY=1 then STOPPING=1
on a real notify socket.  An update started the moment /-/ready says 200 is
counted exactly.  A Ctrl-C during the detach is never lost, and a second
one quits at once."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from tests.conftest import LUOTRACE, REPO, load_json
from tests.test_prometheus import free_port
from tests.test_serve_service import samples
from tests.test_signals import attached_by, left_behind


def get(url: str):
    """(status, body), or None while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def tracing_value(base: str) -> float:
    got = get(base + "/metrics")
    assert got and got[0] == 200
    return samples(got[1])["luotrace_tracing"]


def test_ready_means_watching_and_an_update_at_once_is_counted(model, gmem, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sock_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(60)
    p = subprocess.Popen(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{port}", "--model", model], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, NOTIFY_SOCKET=sock_path))
    try:
        seen_503 = []
        end = time.monotonic() + 120
        while True:
            assert time.monotonic() < end and p.poll() is None, "serve never became ready"
            # /metrics first, /-/ready after: readiness only goes starting -> tracing, so a 503
            # read after the exposition means the exposition was built while starting
            metrics = get(base + "/metrics")
            got = get(base + "/-/ready")
            if got and got[0] == 200:
                break
            if got:
                assert got[0] == 503 and "starting" in got[1], got
                if metrics:  # None only in the instant before serve listened
                    assert metrics[0] == 200
                    seen_503.append(samples(metrics[1])["luotrace_tracing"])
            time.sleep(0.05)
        # the update starts the moment serve says it is ready
        truth = tmp_path / "t.json"
        subprocess.run([model, "--json", str(truth), "kexec:gmem:1M,memfd:512K", "cancel:gmem:256K"],
                       check=True, capture_output=True)
        assert seen_503 and set(seen_503) == {0.0}, "503 (and luotrace_tracing 0) before the probes were attached"
        assert "tracing" in got[1]
        assert tracing_value(base) == 1.0
        assert get(base + "/-/healthy")[0] == 200
        assert notify.recv(4096).decode().splitlines()[0] == "READY=1"
        want = {"guest_memfd": 0, "memfd": 0}
        for f in load_json(str(truth))["files"]:
            want[f["handler"]] += f["folios_preserved"]
        end = time.monotonic() + 10
        while True:  # the next exposition (at most 2 x 0.5 s old) has the update
            m = samples(get(base + "/metrics")[1])
            have = {h: m.get(f'luotrace_folios_preserved_total{{handler="{h}"}}') for h in want}
            if have == want or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert have == want == {"guest_memfd": 256 + 64, "memfd": 128}
    finally:
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert notify.recv(4096).decode().splitlines()[0] == "STOPPING=1"
    notify.close()


def _serve_a_command(model: str, tmp_path) -> subprocess.Popen:
    """serve tracing one model run; after it, serve would linger on the final state."""
    port = free_port()
    return subprocess.Popen(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{port}", "--model", model, "--",
                                        model, "kexec:gmem:256K"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until_detaching(p: subprocess.Popen) -> str:
    err = ""
    while "draining and detaching" not in (line := p.stderr.readline()):
        assert line, "serve ended before detaching: " + p.stderr.read()
        err += line
    return err


def test_a_ctrl_c_during_the_detach_is_not_lost(model, gmem, tmp_path):
    """The command ends, serve detaches (seconds for 30 uprobes): a Ctrl-C
    then means stop after the detach, not linger until another one."""
    p = _serve_a_command(model, tmp_path)
    _until_detaching(p)
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "SIGINT while detaching" in err and "probes detached" in err
    assert "serving the final state until Ctrl-C" not in err


def test_a_second_ctrl_c_during_the_detach_quits_at_once(model, gmem, tmp_path):
    """At once: the process ends (a child it leaves behind takes the kernel's
    seconds of uprobe removal), and its programs are detached soon after."""
    p = _serve_a_command(model, tmp_path)
    _until_detaching(p)
    ours = attached_by(p.pid)
    assert ours
    p.send_signal(signal.SIGINT)
    while "while detaching" not in (line := p.stderr.readline()):
        assert line, "serve ended first"
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 1  # a graceful detach of these 30 uprobes takes about 5 s here
    assert p.returncode == 128 + signal.SIGINT
    assert "SIGINT again: quitting" in err and "Traceback" not in err
    end = time.monotonic() + 60
    while left_behind(ours):
        assert time.monotonic() < end, "the programs of a serve that quit mid-detach stayed attached"
        time.sleep(0.2)


def _wait_ready(base: str, p: subprocess.Popen) -> None:
    end = time.monotonic() + 120
    while (got := get(base + "/-/ready")) is None or got[0] != 200:
        assert time.monotonic() < end and p.poll() is None, "serve never became ready"
        time.sleep(0.05)


def test_a_full_notify_socket_never_wedges_serve(model, gmem, tmp_path):
    """A receiver that reads nothing (its queue full before serve starts):
    serve still becomes ready, counts an update exactly, says once that a
    notification was not sent, and stops on SIGTERM."""
    sock_path = str(tmp_path / "full.sock")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(sock_path)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        while True:
            filler.sendto(b"X=1", sock_path)
    except BlockingIOError:
        pass
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    p = subprocess.Popen(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{port}", "--model", model], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, NOTIFY_SOCKET=sock_path))
    try:
        _wait_ready(base, p)
        truth = tmp_path / "t.json"
        subprocess.run([model, "--json", str(truth), "kexec:gmem:1M"], check=True, capture_output=True)
        want = sum(f["folios_preserved"] for f in load_json(str(truth))["files"])
        end = time.monotonic() + 10
        while (have := samples(get(base + "/metrics")[1]).get('luotrace_folios_preserved_total{handler="guest_memfd"}')) \
                != want and time.monotonic() < end:
            time.sleep(0.2)
        assert have == want == 256
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=60)
        assert time.monotonic() - t < 30
    finally:
        if p.poll() is None:
            p.kill()
        stuck.close()
        filler.close()
    assert p.returncode == 0 and err.count("systemd notification not sent") == 1, err


def test_only_get_and_head_and_head_has_no_body(model, gmem, tmp_path):
    import http.client
    port = free_port()
    p = subprocess.Popen(LUOTRACE + ["serve", "--listen", f"localhost:{port}", "--model", model], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "metrics on" not in (line := p.stderr.readline()):
            assert line, "serve ended: " + p.stderr.read()
        assert f"metrics on http://localhost:{port}/metrics" in line
        for method, status, body in (("GET", 200, True), ("HEAD", 200, False), ("POST", 405, True),
                                     ("PUT", 405, True), ("DELETE", 405, True), ("BREW", 405, True)):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request(method, "/metrics")
            r = c.getresponse()
            data = r.read()
            assert r.status == status, (method, r.status)
            assert bool(data) == body, (method, len(data))
            if status == 405:
                assert r.getheader("Allow") == "GET, HEAD"
            if method == "HEAD":
                assert int(r.getheader("Content-Length")) > 1000
            c.close()
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)


def test_the_metrics_url_is_one_a_browser_takes():
    from tracer.service.http import MetricsServer
    for host, want in (("", "127.0.0.1"), ("[::1]", "[::1]")):
        port = free_port()
        srv = MetricsServer(f"{host}:{port}", lambda: {"recording": {}, "files": []})
        try:
            assert srv.url == f"http://{want}:{port}/metrics"
        finally:
            srv.close()
