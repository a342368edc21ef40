"""One side of `make vmtest-ab`, inside the VM booted on that side's kernel:
the same workload on every series, recorded by luotrace with the label
series=NAME, written into OUT/NAME/ for the host to compare.

    python -m workloads.vm.ab OUT NAME      (OUT/NAME/bzImage: the kernel to kexec into)

boot 1
  doctor.txt          luotrace doctor on this kernel (which ops, which revision)
  scenarios.luo/.json the guest_memfd scenarios (keep, cancel, hwpoison,
                      rejected, novm) and RACES racer runs, with their ground truth
  bench-SIZE.luo      BENCH preserves of a SIZE guest_memfd each (64M, 256M)
  update-1.luo        a recorder running while keep and discard sessions are
                      held, then the kexec into the same kernel
boot 2
  update-2.luo        the retrieve of those sessions (held.json -> retrieved.json)
  update-report.json  both boots joined into one report
  done.json           what ran, and each command's exit status
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

from .inside import start_recorder

PY = sys.executable
RACES = 8
BENCH = 8
SIZES = ("64M", "256M")
GMEM = [PY, "-m", "workloads.gmem_luo"]


def record(out: str, name: str, label: str, cmd: List[str], log: Dict[str, int]) -> None:
    """luotrace record (folio mode) around CMD; its exit status into LOG."""
    r = subprocess.run([PY, "-m", "tracer.cli", "record", "--mode", "folio", "--quiet", "--label", f"series={label}",
                        "-o", os.path.join(out, f"{name}.luo"), "--force", "--", *cmd],
                       capture_output=True, text=True)
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    log[name] = r.returncode


def run(out: str, name: str, cmd: List[str], log: Dict[str, int]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    log[name] = r.returncode


def boot1(out: str, label: str, log: Dict[str, int]) -> None:
    doctor = subprocess.run([PY, "-m", "tracer.cli", "doctor"], capture_output=True, text=True)
    with open(os.path.join(out, "doctor.txt"), "w") as f:
        f.write(doctor.stdout + doctor.stderr)
    log["doctor"] = doctor.returncode
    scenarios = ["keep", "cancel", "hwpoison", "rejected", "novm"] + ["race"] * RACES
    record(out, "scenarios", label, [*GMEM, "--json", os.path.join(out, "scenarios.json"), *scenarios], log)
    for size in SIZES:
        record(out, f"bench-{size}", label, [*GMEM, *[f"bench:{size}"] * BENCH], log)
    # across a real kexec: a recorder until the jump, sessions held for the next kernel
    start_recorder(os.path.join(out, "update-1.luo"), os.path.join(out, "update-1.log"),
                   extra=("--label", f"series={label}"))
    run(out, "held", [*GMEM, "--hold", "--json", os.path.join(out, "held.json"), "keep", "discard"], log)
    with open(os.path.join(out, "boot1.json"), "w") as f:
        json.dump(log, f)
    time.sleep(2)  # the recorder has flushed everything before the jump
    from . import kexec
    with open(os.path.join(out, "stage"), "w") as f:
        f.write("2")
    kexec.load(os.path.join(out, "bzImage"))
    kexec.execute()
    raise SystemExit("kexec returned")  # only if the jump was refused


def boot2(out: str, label: str, log: Dict[str, int]) -> None:
    rec = start_recorder(os.path.join(out, "update-2.luo"), os.path.join(out, "update-2.log"),
                         extra=("--label", f"series={label}"))
    run(out, "retrieve", [*GMEM, "--retrieve", os.path.join(out, "held.json"), "--json",
                          os.path.join(out, "retrieved.json")], log)
    rec.send_signal(signal.SIGINT)
    log["update-2"] = rec.wait(300)
    joined = subprocess.run([PY, "-m", "tracer.cli", "report", "--json", os.path.join(out, "update-1.luo"),
                             os.path.join(out, "update-2.luo")], capture_output=True, text=True)
    with open(os.path.join(out, "update-report.json"), "w") as f:
        f.write(joined.stdout)
    log["update-report"] = joined.returncode


def main(argv: List[str]) -> int:
    root, label = argv[1], argv[2]
    out = os.path.join(root, label)
    os.makedirs(out, exist_ok=True)
    stage_file = os.path.join(out, "stage")
    log: Dict[str, int] = {}
    t0 = time.monotonic()
    if not os.path.exists(stage_file):
        boot1(out, label, log)  # ends in the kexec
    with open(os.path.join(out, "boot1.json")) as f:
        log = {**json.load(f), **log}
    boot2(out, label, log)
    with open(os.path.join(out, "done.json"), "w") as f:
        json.dump({"series": label, "kernel": os.uname().release, "exit": log, "races": RACES, "bench": BENCH,
                   "sizes": list(SIZES), "boot2_seconds": round(time.monotonic() - t0, 1)}, f)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except Exception:  # the guest console drops a script's stderr: keep the traceback beside the results
        import traceback
        with open(os.path.join(sys.argv[1], sys.argv[2], "ab-error.txt"), "a") as f:
            traceback.print_exc(file=f)
        raise
