"""The guest_memfd LUO driver's parts that run on this host: its pattern and
its racer on real guest_memfds, and its refusals.  The preservations
themselves need the patched kernel: `make vmtest` runs them."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from workloads import gmem_luo
from tracer.kernel.backing import VM

from tracer.base.units import PAGE_SIZE as PAGE


def driver(*args):
    return subprocess.run([sys.executable, "-m", "workloads.gmem_luo", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_pattern_written_through_faults_reads_back(gmem):
    with VM() as vm:
        f = vm.create_gmem(64 * PAGE)  # no fallocate: every page comes from a host fault
        gmem_luo.write_pattern(f, 7, 64)
        assert gmem_luo.check_pattern(f.fd, f.size, 7, 64) == 0
        assert gmem_luo.check_pattern(f.fd, f.size, 8, 64) == 64  # another seed's pattern is not there


def test_racer_punches_and_adds_its_page_until_stopped(gmem):
    with VM() as vm:
        f = vm.create_gmem(gmem_luo.RACE_PAGES * PAGE)
        f.populate(0, gmem_luo.RACE_POPULATED * PAGE)
        t0 = time.monotonic_ns()
        racer = gmem_luo.start_racer(f, gmem_luo.RACE_POPULATED, gmem_luo.RACE_PAGES - gmem_luo.RACE_POPULATED)
        time.sleep(0.2)
        stats = gmem_luo.stop_racer(racer)
    assert stats["added"] > 10 and stats["punched"] in (stats["added"], stats["added"] + 1)
    assert stats["refused"] == 0 and stats["other"] == 0  # nothing froze this inode
    assert all(t0 < t < time.monotonic_ns() for t in stats["last_adds_ns"])


@pytest.mark.skipif(os.path.exists("/dev/liveupdate"), reason="this kernel has LUO: the refusal cannot happen")
def test_without_liveupdate_one_line_error_and_exit_2():
    r = driver("keep")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "/dev/liveupdate" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, says", [(["nosuch"], "unknown scenario 'nosuch'"), (["keep:3K"], "multiple of 4 KiB"),
                                        ([], "give scenarios")])
def test_bad_arguments_are_refused_with_the_reason(args, says):
    r = driver(*args)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
