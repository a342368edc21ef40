"""One side of `make vmtest-ab`, inside the VM booted on that side's kernel:
the same workload on every series, recorded by luotrace with the label
series=NAME, written into OUT/NAME/ for the host to compare.

    python -m workloads.vm.ab OUT NAME

  doctor.txt          luotrace doctor on this kernel (which ops, which revision)
  scenarios.luo/.json the guest_memfd scenarios (keep, cancel, hwpoison,
                      rejected) and RACES racer runs, with their ground truth
  bench-SIZE.luo      BENCH preserves of a SIZE guest_memfd each (64M, 256M)
  done.json           what ran, and each command's exit status
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List

PY = sys.executable
RACES = 8
BENCH = 8
SIZES = ("64M", "256M")


def record(out: str, name: str, label: str, cmd: List[str], log: Dict[str, int]) -> None:
    """luotrace record (folio mode) around CMD; its exit status into LOG."""
    r = subprocess.run([PY, "-m", "tracer.cli", "record", "--mode", "folio", "--quiet", "--label", f"series={label}",
                        "-o", os.path.join(out, f"{name}.luo"), "--force", "--", *cmd],
                       capture_output=True, text=True)
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    log[name] = r.returncode


def main(argv: List[str]) -> int:
    root, label = argv[1], argv[2]
    out = os.path.join(root, label)
    os.makedirs(out, exist_ok=True)
    log: Dict[str, int] = {}
    t0 = time.monotonic()
    doctor = subprocess.run([PY, "-m", "tracer.cli", "doctor"], capture_output=True, text=True)
    with open(os.path.join(out, "doctor.txt"), "w") as f:
        f.write(doctor.stdout + doctor.stderr)
    log["doctor"] = doctor.returncode
    scenarios = ["keep", "cancel", "hwpoison", "rejected"] + ["race"] * RACES
    record(out, "scenarios", label,
           [PY, "-m", "workloads.gmem_luo", "--json", os.path.join(out, "scenarios.json"), *scenarios], log)
    for size in SIZES:
        record(out, f"bench-{size}", label, [PY, "-m", "workloads.gmem_luo", *[f"bench:{size}"] * BENCH], log)
    with open(os.path.join(out, "done.json"), "w") as f:
        json.dump({"series": label, "kernel": os.uname().release, "exit": log, "races": RACES, "bench": BENCH,
                   "sizes": list(SIZES), "seconds": round(time.monotonic() - t0, 1)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
