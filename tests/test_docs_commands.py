"""Every command the README and docs/ quote runs as written: each is run
here, in a directory holding the recordings it names (simulated), or the
test says why it cannot run here (a patched kernel, a service that runs
until stopped, the demo's own tests).  /srv and /var/lib paths are taken
inside that directory."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

ROOT = pathlib.Path(REPO)
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
COMMAND = re.compile(r"^(luotrace|make) [a-z]")

# Why a quoted command is not run by this test, by its first words.
NOT_HERE = {
    "make setup": "installs packages: CI's clean checkout runs it (.ci/run)",
    "make demo": "the demo: tests/test_model.py runs it on the model",
    "make test": "this suite itself",
    "make check": "this suite's first tier",
    "make bench": "benchmarks: minutes of load (docs/benchmarks.md has their figures)",
    "make vm-kernel": "builds the lane's kernel: 20-40 min on 2 cores (make vmtest needs it)",
    "make vmtest": "the real-kernel lane: 20-40 min under TCG (tests/vm_lane.py)",
    "make vmtest-ab": "the A/B lane: tests/vm_ab.py",
    "make install-service": "installs a systemd unit on this host (tests/test_serve_service.py renders it)",
    "luotrace record": "traces this kernel's LUO: a kernel with the LUO handlers (the model's runs: tests/test_model.py)",
    "luotrace serve": "serves until stopped (tests/test_prometheus.py and tests/test_serve_ready.py run it)",
    "luotrace demo": "the demo: tests/test_model.py runs it on the model",
    "luotrace top": "reads a running serve, else traces this kernel's LUO (tests/test_top.py runs it on the model)",
    "luotrace top --plain": "reads a running serve, else traces this kernel's LUO (tests/test_top.py)",
    "luotrace top --json": "reads a running serve, else traces this kernel's LUO (tests/test_top.py)",
    "luotrace report before.luo after.luo": "both sides of a real update (tests/test_join.py makes them with the model)",
    "luotrace timeline before.luo after.luo": "both sides of a real update (tests/test_join.py makes them with the model)",
    "luotrace report /persist/before.luo": "both sides of a real update (tests/test_join.py makes them with the model)",
    "luotrace timeline /persist/before.luo": "both sides of a real update (tests/test_join.py makes them with the model)",
}
EXITS = {"luotrace doctor": (0, 1)}  # 1: essential checks fail on a host without LUO, said in one line


def quoted() -> list:
    """(page, line, command) for each command in a code block: indented
    blocks, fenced blocks (only their `$ ` lines when they show output),
    never a ```text block (sample output)."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("```"):
                j = i + 1
                while j < len(lines) and not lines[j].startswith("```"):
                    j += 1
                block = lines[i + 1:j]
                if line.strip() in ("```", "```sh", "```bash"):
                    dollar = [b for b in block if b.startswith("$ ")]
                    for k, b in enumerate(block):
                        text = b[2:] if dollar else b
                        if (not dollar or b.startswith("$ ")) and COMMAND.match(text):
                            out.append((page.name, i + 2 + k, text))
                i = j + 1
                continue
            if line.startswith("    ") and COMMAND.match(line.strip()) and (i == 0 or not lines[i - 1].strip()
                                                                           or lines[i - 1].startswith("    ")):
                out.append((page.name, i + 1, line.strip()))
            i += 1
    return out


def _strip_comment(cmd: str) -> str:
    return re.split(r"\s+#\s", cmd, maxsplit=1)[0].strip()


def _why_not(cmd: str):
    if cmd.startswith("luotrace top --replay"):
        return None  # a recording played back: runs here
    return next((why for k, why in NOT_HERE.items() if cmd == k or cmd.startswith(k + " ")), None)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("docs")

    def sim(path: str, *args: str) -> None:
        (ws / path).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "tracer.cli", "simulate", "-o", str(ws / path), "--files", "4",
                        "--size", "64M", *args], cwd=REPO, check=True, capture_output=True)
    sim("run.luo", "--label", "patch=v3")
    sim("v2.luo", "--label", "patch=v2", "--seed", "1")
    sim("v3.luo", "--label", "patch=v3", "--seed", "2", "--slow", "fill_pass=1.12")
    for i in range(3):
        sim(f"runs/v3-{i}.luo", "--label", "patch=v3", "--seed", str(10 + i), "--run-noise", "3")
        sim(f"runs/v4-{i}.luo", "--label", "patch=v4", "--seed", str(20 + i), "--run-noise", "3")
    for i in range(6):
        sim(f"v2-{i}.luo", "--label", "patch=v2", "--seed", str(30 + i), "--run-noise", "3")
        sim(f"v3-{i}.luo", "--label", "patch=v3", "--seed", str(40 + i), "--run-noise", "3", "--slow",
            "fill_pass=1.12")
        sim(f"var/lib/luotrace/u{i}.luo", "--label", f"patch=v{3 + i % 2}", "--label", "pool=j",
            "--seed", str(50 + i), "--hostname", f"host{i % 3}")
    subprocess.run([sys.executable, "-m", "tracer.cli", "export", "--parquet", str(ws / "srv" / "luofleet"),
                    *sorted(str(p) for p in (ws / "var" / "lib" / "luotrace").glob("*.luo"))], cwd=REPO, check=True,
                   capture_output=True)
    return ws


COMMANDS = quoted()


def test_the_docs_quote_commands():
    assert len(COMMANDS) >= 20 and any(c.startswith("luotrace fleet") for _, _, c in COMMANDS)


@pytest.mark.parametrize("page, line, cmd", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_a_quoted_command_runs_as_written(workspace, tmp_path, page, line, cmd):
    cmd = _strip_comment(cmd)
    why = _why_not(cmd)
    if why:
        pytest.skip(f"{page}:{line} `{cmd}`: {why}")
    bindir = os.path.dirname(sys.executable)
    # the docs' absolute paths, inside the workspace (in order: the fleet dataset, the recordings)
    here = cmd.replace("/srv/", f"{tmp_path}/srv/").replace("/var/lib/", f"{tmp_path}/var/lib/")
    for entry in workspace.iterdir():  # the recordings, shared; what the command writes, its own
        (tmp_path / entry.name).symlink_to(entry)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "-c", here], cwd=REPO if cmd.startswith("make ") else tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    ok = EXITS.get(cmd.split(" --")[0], (0,))
    assert r.returncode in ok, f"{page}:{line} `{cmd}` exited {r.returncode}: {r.stderr[-800:]}"
    assert "Traceback" not in r.stderr
