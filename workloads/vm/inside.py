"""Runs inside the VM (`make vmtest`): luotrace against real LUO work on the
Linux 7.2 kernel.  Everything it learns is written as files into OUT (a
directory shared with the host), where tests/vm_lane.py asserts on it.

    python -m workloads.vm.inside OUT [KERNEL_CACHE_DIR]
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

PY = sys.executable
DRIVER = ["-m", "workloads.liveupdate", "keep:4M,1M:sparse", "cancel:2M", "errors"]


def sh(cmd, out_path=None, **kw) -> int:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out_path:
        with open(out_path, "w") as f:
            f.write(r.stdout)
    with open(os.path.join(OUT, "log.txt"), "a") as f:
        f.write(f"$ {' '.join(cmd)}\nrc={r.returncode}\n{r.stderr[-4000:]}\n")
    return r.returncode


def selftests(kdir: str) -> None:
    """The kernel's own LUO selftest (kselftest harness), without and with luotrace attached."""
    st = os.path.join(kdir, "selftests", "liveupdate")
    rc = sh([st], os.path.join(OUT, "selftest-untraced.txt"))
    rc2 = sh([PY, "-m", "tracer.cli", "record", "--mode", "folio", "--handler", "memfd", "--quiet", "-o",
              os.path.join(OUT, "selftest.luo"), "--", st], os.path.join(OUT, "selftest-traced.txt"))
    with open(os.path.join(OUT, "selftests.json"), "w") as f:
        json.dump({"untraced_rc": rc, "traced_rc": rc2}, f)


def main() -> None:
    info = {"kernel": platform.release(), "liveupdate": os.path.exists("/dev/liveupdate"),
            "kheaders": os.path.exists("/sys/kernel/kheaders.tar.xz"), "btf": os.path.exists("/sys/kernel/btf/vmlinux")}
    with open(os.path.join(OUT, "info.json"), "w") as f:
        json.dump(info, f)
    sh([PY, "-m", "tracer.cli", "doctor", "--json"], os.path.join(OUT, "doctor.json"))
    for mode, strategy in (("light", "auto"), ("folio", "auto"), ("folio", "kprobe")):
        tag = mode if strategy == "auto" else f"{mode}-{strategy}"
        sh([PY, "-m", "tracer.cli", "record", "--mode", mode, "--strategy", strategy, "--handler", "memfd", "-o",
            os.path.join(OUT, f"{tag}.luo"), "--json", "--", PY, *DRIVER[:2], "--json",
            os.path.join(OUT, f"truth-{tag}.json"), *DRIVER[2:]], os.path.join(OUT, f"report-{tag}.json"))
    sh([PY, *DRIVER[:2], "--json", os.path.join(OUT, "truth-untraced.json"), *DRIVER[2:]])
    if len(sys.argv) > 2:
        selftests(sys.argv[2])


if __name__ == "__main__":
    OUT = sys.argv[1]
    main()
