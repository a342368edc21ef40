"""Shared fixtures.  These tests load real BPF into the running kernel, drive
guest_memfd files and run the reference model under uprobes: they need root
and the set-up `make test` performs.  They never skip on these machines for
want of set-up; outside them they fail with the reason (LUOTRACE_ALLOW_SKIP=1
turns those failures into skips for a developer's laptop).

guest_memfd files are real where the host's KVM makes them and stand-ins
(tracer/kernel/backing.py) where it does not: a test that needs no real guest_memfd
inode runs on either (fixture ``gmem``); the few that do (``real_gmem``) are
skipped with the capability probe's reason, the one skip a host may cause."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "workloads", "model", "luo_model")
LUOTRACE = [sys.executable, "-m", "tracer.cli"]


KERNEL_FIXTURES = {"root", "model", "gmem", "real_gmem"}


def pytest_collection_modifyitems(items) -> None:
    """The kernel tier: every test that uses a fixture needing root, BPF or
    /dev/kvm (directly or through another fixture).  `make check` runs the
    rest: the unit tier, no root and no set-up."""
    for item in items:
        if KERNEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kernel)


def need(cond: bool, why: str) -> None:
    if cond:
        return
    if os.environ.get("LUOTRACE_ALLOW_SKIP") == "1":
        pytest.skip(why)
    pytest.fail(f"environment not ready: {why} (run `make setup` as root)")


@pytest.fixture(scope="session")
def root() -> None:
    need(os.geteuid() == 0, "tests load BPF programs: run as root")


@pytest.fixture(scope="session")
def model(root) -> str:
    if not os.path.exists(MODEL):
        subprocess.run(["make", "-C", REPO, "model"], check=True, capture_output=True)
    need(os.path.exists(MODEL), "reference model not built")
    return MODEL


@pytest.fixture(scope="session")
def gmem(root):
    """What this host's guest_memfd files are (real, or stand-ins and why)."""
    from tracer.kernel.backing import choose
    return choose()


@pytest.fixture(scope="session")
def real_gmem(root):
    """A test of a real guest_memfd inode: skipped, with the capability
    probe's reason, on a host whose KVM makes none."""
    from tracer.kernel.kvm import probe
    sup = probe()
    if not sup.ok:
        pytest.skip(f"needs a real guest_memfd: {sup.why}")
    return sup


def run_cli(*args: str, check: bool = False, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(LUOTRACE + list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"luotrace {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def wait_tracing(p: subprocess.Popen) -> None:
    """Read a `luotrace record` child's stderr until its probes are attached."""
    while "luotrace: tracing" not in (line := p.stderr.readline()):
        assert line, "luotrace ended before tracing: " + p.stderr.read()
