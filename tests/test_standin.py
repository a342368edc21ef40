"""guest_memfd stand-ins (a ramfs page-cache file where KVM makes no
guest_memfd): bounded by the host's memory, and mounted only on a directory
of root's own (issue 28)."""
from __future__ import annotations

import os
import subprocess

import pytest

from tracer.kernel import kvm, standin
from tracer.kernel import kvm_abi as abi


def test_a_standin_larger_than_memory_is_refused_in_one_line(model):
    r = subprocess.run([model, "--gmem", "standin", "kexec:gmem:1024G"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "does not fit this host's memory" in r.stderr and _errors(r.stderr) == 1, r.stderr
    with pytest.raises(kvm.GmemError, match="does not fit this host's memory"):
        standin.create_standin(1 << 40)


def _errors(stderr: str) -> int:
    """Lines of STDERR besides the model's notice that its files are stand-ins."""
    return len([ln for ln in stderr.splitlines() if "are stand-ins (ramfs" not in ln])


@pytest.fixture
def no_standin_mount(root):
    """The stand-in mount point gone (unmounted, removed) for the test, and
    left for the next stand-in to make again."""
    if os.path.ismount(abi.STANDIN_DIR):
        subprocess.run(["umount", abi.STANDIN_DIR], check=True)
    if os.path.isdir(abi.STANDIN_DIR) and not os.path.islink(abi.STANDIN_DIR):
        os.rmdir(abi.STANDIN_DIR)
    yield abi.STANDIN_DIR
    if os.path.islink(abi.STANDIN_DIR) or os.path.isfile(abi.STANDIN_DIR):
        os.unlink(abi.STANDIN_DIR)


@pytest.mark.parametrize("what", ["symlink", "file"])
def test_a_symlink_or_file_at_the_mount_point_is_refused_not_mounted_through(model, no_standin_mount, tmp_path, what):
    target = tmp_path / "target"
    target.mkdir()
    if what == "symlink":
        os.symlink(str(target), abi.STANDIN_DIR)
    else:
        open(abi.STANDIN_DIR, "w").close()
    r = subprocess.run([model, "--gmem", "standin", "kexec:gmem:64K"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and ("a symlink" if what == "symlink" else "not a directory") in r.stderr, r.stderr
    assert _errors(r.stderr) == 1
    with pytest.raises(kvm.GmemError, match="symlink" if what == "symlink" else "not a directory"):
        standin.create_standin(1 << 20)
    assert not os.path.ismount(str(target)) and not os.listdir(target)


def test_standins_work_again_after_the_mount_point_is_made_anew(model, no_standin_mount):
    f = standin.create_standin(1 << 20)
    try:
        assert os.path.ismount(abi.STANDIN_DIR) and os.stat(abi.STANDIN_DIR).st_mode & 0o777 == 0o700
    finally:
        os.close(f.fd)
