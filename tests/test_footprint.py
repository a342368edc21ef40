"""Once its programs are loaded, an agent gives the compiler's memory back
(tracer/attach/footprint.py), and nothing is lost by it: the compiler still works
after, its pages fault back in from the file."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

CHILD = r"""
import json
from bcc import BPF
from tracer.attach import footprint
PROG = "int hello(void *ctx) { return 0; }"
BPF(text=PROG).load_func("hello", BPF.KPROBE)
before = footprint.rss()
released = footprint.release_compiler()
after = footprint.rss()
BPF(text=PROG.replace("hello", "again")).load_func("again", BPF.KPROBE)  # compiles again after the release
print(json.dumps({"before": before, "after": after, "released": released}))
"""


def test_the_compiler_is_released_and_still_works(root):
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    b, a = res["before"], res["after"]
    # clang and LLVM's code after one compile is tens of MiB of file pages
    assert b["RssFile"] - a["RssFile"] > 20 * 1024, res
    assert res["released"] > 20 * 1024 and a["VmRSS"] < b["VmRSS"], res


def test_serve_after_the_release_still_counts_an_update(root, model, gmem, tmp_path):
    """The release happens before /-/ready: an update after it is counted exactly."""
    import time
    import urllib.request

    from tests.bench import _free_port
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "tracer.cli", "serve", "--listen", f"127.0.0.1:{port}", "--model", model],
                         cwd=REPO, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        subprocess.run([model, "--json", str(tmp_path / "truth.json"), "kexec:memfd:256K,memfd:512K"], check=True,
                       capture_output=True)
        time.sleep(1.5)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        p.terminate()
        p.wait(60)
    line = [ln for ln in body.splitlines() if ln.startswith('luotrace_folios_preserved_total{handler="memfd"')]
    assert line and float(line[0].split()[-1]) == 192, line  # 64 + 128 pages
