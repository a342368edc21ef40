"""One boot of one side of `make vmtest-ab`, inside the VM booted on that
side's kernel.  The host boots the sides in turn, A B A B ... (interleaved in
time, so that a host disturbance falls on both sides), each side BOOTS times;
every boot runs the same benchmark first, recorded by luotrace with the
labels series=NAME, side=A|B and boot=K, so compare takes the boot as its
unit.  A side's first boot then also runs the scenarios and the update across
a real kexec.

    python -m workloads.vm.ab OUT SIDE SERIES BOOT    (OUT/SIDE/bzImage: the kernel to kexec into)

every boot, OUT/SIDE/boot-K/
  bench-SIZE.luo      BENCH preserves of a SIZE guest_memfd each (64M, 256M), first thing
  done.json           what ran, each command's exit status, the boot id
boot 1 also, OUT/SIDE/
  doctor.txt          luotrace doctor on this kernel (which ops, which revision)
  scenarios.luo/.json the guest_memfd scenarios (keep, cancel, hwpoison, rejected,
                      novm) and RACES racer runs, with their ground truth
  update-1.luo        a recorder running while keep and discard sessions are
                      held, then the kexec into the same kernel
  (after the kexec) update-2.luo, update-report.json (both boots joined), done.json
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

from .inside import hold_a_vm, start_recorder

PY = sys.executable
RACES = 8
BENCH = 8
SIZES = ("64M", "256M")
GMEM = [PY, "-m", "workloads.gmem_luo"]


def record(out: str, name: str, labels: List[str], cmd: List[str], log: Dict[str, int]) -> None:
    """luotrace record (folio mode) around CMD; its exit status into LOG."""
    r = subprocess.run([PY, "-m", "tracer.cli", "record", "--mode", "folio", "--quiet",
                        *[x for lb in labels for x in ("--label", lb)],
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


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def bench(out: str, labels: List[str], log: Dict[str, int]) -> None:
    """The workload every boot runs, first, the same way."""
    for size in SIZES:
        record(out, f"bench-{size}", labels, [*GMEM, *[f"bench:{size}"] * BENCH], log)


def scenarios_and_kexec(side_dir: str, labels: List[str], log: Dict[str, int]) -> None:
    doctor = subprocess.run([PY, "-m", "tracer.cli", "doctor"], capture_output=True, text=True)
    with open(os.path.join(side_dir, "doctor.txt"), "w") as f:
        f.write(doctor.stdout + doctor.stderr)
    log["doctor"] = doctor.returncode
    scenarios = ["keep", "cancel", "hwpoison", "rejected", "novm"] + ["race"] * RACES
    record(side_dir, "scenarios", labels, [*GMEM, "--json", os.path.join(side_dir, "scenarios.json"), *scenarios],
           log)
    # across a real kexec: a recorder until the jump, sessions held for the next kernel
    start_recorder(os.path.join(side_dir, "update-1.luo"), os.path.join(side_dir, "update-1.log"),
                   extra=tuple(x for lb in labels for x in ("--label", lb)))
    run(side_dir, "held", [*GMEM, "--hold", "--json", os.path.join(side_dir, "held.json"), "keep", "discard"], log)
    with open(os.path.join(side_dir, "boot1.json"), "w") as f:
        json.dump(log, f)
    time.sleep(2)  # the recorder has flushed everything before the jump
    from . import kexec
    with open(os.path.join(side_dir, "stage"), "w") as f:
        f.write("2")
    kexec.load(os.path.join(side_dir, "bzImage"))
    kexec.execute()
    raise SystemExit("kexec returned")  # only if the jump was refused


def after_kexec(side_dir: str, labels: List[str], log: Dict[str, int]) -> None:
    rec = start_recorder(os.path.join(side_dir, "update-2.luo"), os.path.join(side_dir, "update-2.log"),
                         extra=tuple(x for lb in labels for x in ("--label", lb)))
    run(side_dir, "retrieve", [*GMEM, "--retrieve", os.path.join(side_dir, "held.json"), "--json",
                               os.path.join(side_dir, "retrieved.json")], log)
    rec.send_signal(signal.SIGINT)
    log["update-2"] = rec.wait(300)
    joined = subprocess.run([PY, "-m", "tracer.cli", "report", "--json", os.path.join(side_dir, "update-1.luo"),
                             os.path.join(side_dir, "update-2.luo")], capture_output=True, text=True)
    with open(os.path.join(side_dir, "update-report.json"), "w") as f:
        f.write(joined.stdout)
    log["update-report"] = joined.returncode


def main(argv: List[str]) -> int:
    root, side, series, boot = argv[1], argv[2], argv[3], int(argv[4])
    # Every recorder compiles its programs, as in `make vmtest` (workloads/vm/inside.py): the one
    # A/B run whose recorders reused the programs the benchmark's had kept saw no kexec (update-1
    # ended "cut short" on both sides); reuse across a kexec is not what this lane checks.
    os.environ["LUOTRACE_BPF_CACHE"] = "0"
    side_dir = os.path.join(root, side)
    boot_dir = os.path.join(side_dir, f"boot-{boot}")
    os.makedirs(boot_dir, exist_ok=True)
    # the preempt-notifier static key flips once, at this boot, not after each driver's VMs
    # go away: TCG's int3 oops at __schedule+0x413 killed every A/B boot without it
    hold_a_vm()
    labels = [f"series={series}", f"side={side}", f"boot={boot}"]
    stage_file = os.path.join(side_dir, "stage")
    t0 = time.monotonic()
    log: Dict[str, int] = {}
    if boot == 1 and os.path.exists(stage_file):  # the same command, run again in the kernel kexec'd into
        with open(os.path.join(side_dir, "boot1.json")) as f:
            log = json.load(f)
        after_kexec(side_dir, labels, log)
        with open(os.path.join(side_dir, "done.json"), "w") as f:
            json.dump({"series": series, "side": side, "kernel": os.uname().release, "exit": log, "races": RACES,
                       "bench": BENCH, "sizes": list(SIZES)}, f)
        return 0
    bench(boot_dir, labels, log)
    with open(os.path.join(boot_dir, "done.json"), "w") as f:
        json.dump({"series": series, "side": side, "boot": boot, "boot_id": boot_id(), "kernel": os.uname().release,
                   "exit": dict(log), "bench_seconds": round(time.monotonic() - t0, 1)}, f)
    if boot == 1:
        scenarios_and_kexec(side_dir, labels, log)  # ends in the kexec
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except Exception:  # the guest console drops a script's stderr: keep the traceback beside the results
        import traceback
        with open(os.path.join(sys.argv[1], sys.argv[2], "ab-error.txt"), "a") as f:
            traceback.print_exc(file=f)
        raise
