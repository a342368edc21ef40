"""The unit tier (`make check`'s pytest part) needs no root: run it as
nobody, as a developer without privileges would."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import REPO

NOBODY = 65534


def test_the_unit_tier_passes_as_nobody(root):
    if os.environ.get("LUOTRACE_CHECKED_AS_NOBODY") == "1":
        pytest.skip("make test's check ran the unit tier as nobody just before (Makefile: check)")
    d = tempfile.mkdtemp(prefix="luotrace-nobody-")  # pytest's own tmp_path is root's alone
    try:
        os.chown(d, NOBODY, NOBODY)
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            "env", f"HOME={d}", f"TMPDIR={d}",
                            sys.executable, "-m", "pytest", "-q", "-m", "not kernel", "-p", "no:cacheprovider",
                            "--basetemp", os.path.join(d, "t"), "tests"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "deselected" in r.stdout
