"""The shipped unit's sandbox (exporters/systemd/luotrace.service), as the
service sees it: ProtectSystem=strict makes every file system read-only but
/dev, /proc, /sys and the paths the unit opens (ReadWritePaths=,
StateDirectory=, RuntimeDirectory=, PrivateTmp=).  No systemd runs on these
machines, so the test builds that view itself in a private mount namespace
(unshare -m) from the unit's own lines, then runs serve as ExecStart= does:
it must keep its programs between starts and trace a stand-in's population
(neither may meet a read-only file system)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

from tests.conftest import REPO
from tests.test_prometheus import free_port

UNIT = os.path.join(REPO, "exporters", "systemd", "luotrace.service")


def unit() -> dict:
    out: dict = {}
    for line in open(UNIT):
        m = re.match(r"^([A-Za-z]+)=(.*)$", line.strip())
        if m:
            out.setdefault(m.group(1), []).append(m.group(2).replace("@LUOTRACE_HOME@", REPO))
    return out


def writable(u: dict) -> list:
    """What ProtectSystem=strict leaves writable for this unit."""
    paths = [p for v in u.get("ReadWritePaths", []) for p in v.split()]
    paths += [f"/var/lib/{d}" for v in u.get("StateDirectory", []) for d in v.split()]
    paths += [f"/run/{d}" for v in u.get("RuntimeDirectory", []) for d in v.split()]
    if u.get("PrivateTmp") == ["yes"]:
        paths.append("/tmp")
    return paths


SANDBOX = r"""
set -e
for rw in "$@"; do mkdir -p "$rw"; done
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mp; do
  case "$mp" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*) ;; *) mount -o remount,bind,ro "$mp" 2>/dev/null || true ;; esac
done
for rw in "$@"; do mount --bind "$rw" "$rw"; mount -o remount,bind,rw "$rw"; done
touch /usr/.luotrace-probe 2>/dev/null && { echo "sandbox: /usr is writable" >&2; exit 99; }
exec "$SERVE" "${ARGS[@]}"
"""


def test_the_unit_verifies_and_its_sandbox_keeps_programs_and_traces_standins(model, gmem, tmp_path):
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", UNIT], capture_output=True, text=True)
        assert "RuntimeDirectory" not in r.stderr, r.stderr
    u = unit()
    assert u["ProtectSystem"] == ["strict"]
    exec_start = u["ExecStart"][0].split()
    assert "--state-dir" in exec_start
    rw = writable(u)
    errs = []
    for i in range(2):
        port = free_port()
        args = [a if not a.startswith("127.0.0.1:") else f"127.0.0.1:{port}" for a in exec_start[1:]]
        args += ["--model", model, "--gmem", "standin", "--", model, "--gmem", "standin", "kexec:gmem:1M"]
        script = SANDBOX.replace('"$SERVE" "${ARGS[@]}"', " ".join(f"'{a}'" for a in [exec_start[0]] + args))
        p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c", script, "sandbox", *rw],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
        err = ""
        try:
            while "serving the final state" not in (line := p.stderr.readline()):
                assert line, "serve ended in its sandbox: " + err + p.stderr.read()
                err += line
        finally:
            p.send_signal(signal.SIGTERM)
            err += p.communicate(timeout=120)[1]
        errs.append(err)
        assert p.returncode == 0, err
    first, second = errs
    for err in errs:
        assert "Read-only file system" not in err and "not kept between starts" not in err, err
    assert "programs kept loaded by the last start" in second, second
