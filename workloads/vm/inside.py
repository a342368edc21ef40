"""Runs inside the VM (`make vmtest`): luotrace against real LUO work on the
Linux 7.2 kernel.  Everything it learns is written as files into OUT (a
directory shared with the host), where tests/vm_lane.py asserts on it.

    python -m workloads.vm.inside OUT [KERNEL_CACHE_DIR]
"""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

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


BPFTRACE = ("kprobe:memfd_luo_preserve { @in[tid] = 1; } kretprobe:memfd_luo_preserve { delete(@in[tid]); } "
            "kprobe:kho_preserve_folio /@in[tid]/ { @folios = count(); }")


def side_by_side() -> None:
    """bpftrace counts kho_preserve_folio calls inside memfd_luo_preserve on the same run."""
    bt = subprocess.Popen(["bpftrace", "-e", BPFTRACE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    while "Attaching" not in line:
        line = bt.stdout.readline()
        if not line:
            break
    time.sleep(1)
    sh([PY, "-m", "tracer.cli", "record", "--mode", "folio", "--handler", "memfd", "-o",
        os.path.join(OUT, "sbs.luo"), "--json", "--", PY, *DRIVER[:2], "--json",
        os.path.join(OUT, "truth-sbs.json"), *DRIVER[2:]], os.path.join(OUT, "report-sbs.json"))
    bt.send_signal(signal.SIGINT)
    out, _ = bt.communicate(timeout=120)
    m = re.search(r"@folios: (\d+)", out)
    with open(os.path.join(OUT, "bpftrace.json"), "w") as f:
        json.dump({"folios": int(m.group(1)) if m else None, "output": out[-2000:]}, f)


def vmbench(reps: int = 3) -> None:
    """Overhead on a real 256 MiB memfd preserve: untraced baseline and each mode, same VM run."""
    res = {}
    for cfg in ("untraced", "light", "folio", "untraced2"):
        times = []
        for r in range(reps):
            truth = os.path.join(OUT, f"bench-{cfg}-{r}.json")
            drv = [PY, "-m", "workloads.liveupdate", "--json", truth, "keep:256M"]
            if cfg.startswith("untraced"):
                sh(drv)
            else:
                sh([PY, "-m", "tracer.cli", "record", "--mode", cfg, "--handler", "memfd", "--quiet", "-o",
                    os.path.join(OUT, f"bench-{cfg}.luo"), "--", *drv])
            with open(truth) as f:
                times.append(json.load(f)["files"][0]["preserve_ns"])
        res[cfg] = times
    with open(os.path.join(OUT, "vmbench.json"), "w") as f:
        json.dump(res, f)


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
    side_by_side()
    vmbench()


if __name__ == "__main__":
    OUT = sys.argv[1]
    main()
