"""Runs inside the VM (`make vmtest`): luotrace against real LUO work on the
Linux 7.2 kernel.  Everything it learns is written as files into OUT (a
directory shared with the host), where tests/vm_lane.py asserts on it.

    python -m workloads.vm.inside OUT [KERNEL_DIR]

KERNEL_DIR holds bzImage and selftests/.  The VM live-updates itself twice:
a kexec reuses this boot's command line, so the new kernel runs this script
again and OUT/stage says where it is:

  boot 1  the single-kernel checks (memfd, then the guest_memfd handler under
          review); the kexec selftests' stage 1, untraced; kexec
  boot 2  their stage 2, untraced; then luotrace records while their stage 1
          runs again with sessions of known memfds and of guest_memfds (with
          their VMs) held open; kexec with the recorder still running
  boot 3  luotrace records stage 2 and the retrieve of those files; the two
          recordings are joined into one report

LUOTRACE_VM_ONLY=kexec runs only the selftests and memfds across the kexecs,
LUOTRACE_VM_ONLY=gmem only the guest_memfd part (both boots' halves).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List

PY = sys.executable
DRIVER = ["-m", "workloads.liveupdate", "keep:4M,1M:sparse", "cancel:2M", "errors"]


def sh(cmd, out_path=None, **kw) -> int:
    r = subprocess.run(cmd, capture_output=True, text=True, errors="backslashreplace", **kw)
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


def bpftrace_program(handler: str) -> str:
    """kho_preserve_folio calls made inside HANDLER's preserve and
    kho_unpreserve_folio calls inside its unpreserve (a cancel) for the
    file's data, counted by bpftrace: those inside kho_alloc_preserve and
    kho_unpreserve_free are KHO's own metadata page and are left out."""
    pre, un = f"{handler}_preserve", f"{handler}_unpreserve"
    return (f"kprobe:{pre} {{ @in[tid] = 1; }} kretprobe:{pre} {{ delete(@in[tid]); }} "
            f"kprobe:{un} {{ @un[tid] = 1; }} kretprobe:{un} {{ delete(@un[tid]); }} "
            "kprobe:kho_alloc_preserve { @meta[tid] = 1; } kretprobe:kho_alloc_preserve { delete(@meta[tid]); } "
            "kprobe:kho_unpreserve_free { @meta[tid] = 1; } kretprobe:kho_unpreserve_free { delete(@meta[tid]); } "
            "kprobe:kho_preserve_folio /@in[tid] && !@meta[tid]/ { @folios = count(); } "
            "kprobe:kho_unpreserve_folio /@un[tid] && !@meta[tid]/ { @unpreserved = count(); }")


# The CPUs of a traced update in boots 2 and 3: the tracers (luotrace's record
# and top, bpftrace's user side) on the first, the work they trace on the
# second.  A BPF map syscall holds its CPU's BPF guard (bpf_prog_active), and
# this kernel (preempt=lazy) can preempt the task holding it: until that task
# runs again, every kprobe program on that CPU is skipped.  top reads maps each
# frame; beside it bpftrace's kprobes missed 680 of 4,092 kho_restore_folio
# calls (the lane at e384f4a).  Kept apart, no traced work runs on a CPU whose
# guard a tracer holds; bpftrace's skipped runs are counted all the same.
TRACER_CPUS, WORK_CPUS = {0}, {1}


TWO_CPUS = {0, 1} <= os.sched_getaffinity(0)  # as the script starts: a pinned block must not hide them


def on_tracer_cpus() -> None:
    """preexec_fn of a tracer: on TRACER_CPUS (where there are two)."""
    if TWO_CPUS:
        os.sched_setaffinity(0, TRACER_CPUS)


@contextlib.contextmanager
def on_work_cpus():
    """This process, and what it starts meanwhile, on WORK_CPUS."""
    was = os.sched_getaffinity(0)
    if TWO_CPUS:
        os.sched_setaffinity(0, WORK_CPUS)
    try:
        yield
    finally:
        os.sched_setaffinity(0, was)


def skipped_runs(pid: int) -> int:
    """Runs of PID's BPF programs the kernel skipped (recursion_misses), each program once."""
    from tracer.kernel.host import prog_stats
    progs = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        st = prog_stats(int(fd), str(pid))
        if st["prog_id"]:
            progs[st["prog_id"]] = st["recursion_misses"]
    return sum(progs.values())


def with_bpftrace(program: str, out_name: str, run) -> None:
    """Run RUN while bpftrace runs PROGRAM; its @folios and @unpreserved
    counts, and the runs of its programs the kernel skipped, go to OUT_NAME."""
    bt = subprocess.Popen(["bpftrace", "-e", program], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=on_tracer_cpus)
    line = ""
    while "Attaching" not in line:
        line = bt.stdout.readline() if bt.stdout else ""
        if not line:
            break
    time.sleep(1)
    run()
    missed = skipped_runs(bt.pid)
    bt.send_signal(signal.SIGINT)
    out, _ = bt.communicate(timeout=120)
    got = {k: re.search(rf"@{k}: (\d+)", out) for k in ("folios", "unpreserved")}
    with open(os.path.join(OUT, out_name), "w") as f:
        json.dump({**{k: int(m.group(1)) if m else None for k, m in got.items()}, "missed": missed,
                   "output": out[-2000:]}, f)


def side_by_side() -> None:
    """bpftrace counts kho_preserve_folio calls inside memfd_luo_preserve on the same run."""
    with_bpftrace(bpftrace_program("memfd_luo"), "bpftrace.json", lambda: sh(
        [PY, "-m", "tracer.cli", "record", "--mode", "folio", "--handler", "memfd", "-o",
         os.path.join(OUT, "sbs.luo"), "--json", "--", PY, *DRIVER[:2], "--json",
         os.path.join(OUT, "truth-sbs.json"), *DRIVER[2:]], os.path.join(OUT, "report-sbs.json")))


GMEM = ["-m", "workloads.gmem_luo"]
GMEM_SCENARIOS = ["keep", "cancel", "rejected", "hwpoison", "race"]
GMEM_HELD = ["keep", "discard"]


def gmem_record(tag: str, mode: str, strategy: str = "auto", extra=()) -> None:
    sh([PY, "-m", "tracer.cli", "record", "--mode", mode, "--strategy", strategy, *extra, "--handler", "guest_memfd",
        "-o", os.path.join(OUT, f"{tag}.luo"), "--json", "--", PY, *GMEM, "--json",
        os.path.join(OUT, f"truth-{tag}.json"), *GMEM_SCENARIOS], os.path.join(OUT, f"report-{tag}.json"))


def gmem_single_kernel() -> None:
    """The guest_memfd LUO handler under review, on the patched kernel: every
    scenario traced with fentry (bpftrace counting beside it), with kprobes
    and in light mode."""
    with_bpftrace(bpftrace_program("kvm_gmem_luo"), "bpftrace-gmem.json",
                  lambda: gmem_record("gmem-folio", "folio"))
    gmem_record("gmem-folio-kprobe", "folio", "kprobe")
    gmem_record("gmem-folio-latency", "folio", extra=("--folio-latency",))
    gmem_record("gmem-light", "light")


# handler -> (result file, the driver for N preserves).  memfds are preserved
# one per process: memfd_luo pins each folio long-term, and with earlier
# 256 MiB memfds still held the kernel's pinning (which migrates movable
# pages) makes each later preserve slower (52 ms to 1.9 s seen here).
BENCH_DRIVERS = {"memfd": ("vmbench.json", lambda n, truth: [[PY, "-m", "workloads.liveupdate", "--json",
                                                              f"{truth}.{i}", "keep:256M"] for i in range(n)]),
                 "guest_memfd": ("vmbench-gmem.json", lambda n, truth: [[PY, *GMEM, "--json", f"{truth}.0",
                                                                         *["bench:256M"] * n]])}


def vmbench(handlers, reps: int = 5) -> None:
    """A 256 MiB preserve of each handler's file, REPS times per setting:
    untraced, under a recorder in light mode, in folio mode, untraced again.
    One recorder per mode (all handlers), started before its runs: the BPF
    compile under emulation is paid once, and every setting runs in this VM."""
    res: Dict[str, Dict[str, List[int]]] = {h: {} for h in handlers}

    def runs(cfg: str) -> None:
        for h in handlers:
            truth = os.path.join(OUT, f"bench-{h}-{cfg}.json")
            res[h][cfg] = []
            for i, cmd in enumerate(BENCH_DRIVERS[h][1](reps, truth)):
                sh(cmd)
                with open(f"{truth}.{i}") as f:
                    res[h][cfg] += [x["preserve_ns"] for x in json.load(f)["files"]]

    runs("untraced")
    for cfg in ("light", "folio", "folio-latency"):
        tag = f"bench-{'-'.join(handlers)}-{cfg}"  # vmbench runs once per handler: a path each
        rec = start_recorder(os.path.join(OUT, f"{tag}.luo"), os.path.join(OUT, f"{tag}.log"),
                             mode=cfg.split("-")[0], extra=("--folio-latency",) if cfg == "folio-latency" else ())
        runs(cfg)
        rec.send_signal(signal.SIGINT)
        rec.wait(300)
    runs("untraced2")
    for h in handlers:
        with open(os.path.join(OUT, BENCH_DRIVERS[h][0]), "w") as f:
            json.dump(res[h], f)


KEXEC_TESTS = ("luo_kexec_simple", "luo_multi_session", "luo_stress_files", "luo_stress_sessions")
HELD = ["keep:4M,1M:sparse", "keep:2M"]


def kexec_selftests(kdir: str, stage: int, tag: str) -> None:
    st = os.path.join(kdir, "selftests")
    res = {}
    for t in KEXEC_TESTS:
        res[t] = sh([os.path.join(st, t), "--stage", str(stage)], os.path.join(OUT, f"{tag}-{t}.txt"))
    with open(os.path.join(OUT, f"{tag}.json"), "w") as f:
        json.dump(res, f)


def start_recorder(path: str, log: str, mode: str = "folio", handler: str = "", extra=()) -> subprocess.Popen:
    """luotrace record with no command: it runs until SIGINT or the kexec.
    Every file handler is traced unless HANDLER names one."""
    return start_luotrace(["record", "--mode", mode, *extra, *(["--handler", handler] if handler else []),
                           "--quiet", "-o", path], log)


def start_top(log: str, extra=()) -> subprocess.Popen:
    """luotrace top --plain with probes of its own (no serve here), a frame
    each half second, until SIGINT or the kexec: what an operator watching
    the update would have seen, line by line, in LOG."""
    return start_luotrace(["top", "--plain", *extra, "0.5"], log)


def start_luotrace(args: List[str], log: str) -> subprocess.Popen:
    """A luotrace command that traces until stopped, once it says it is
    tracing.  Its output is read from a pipe (a file on the shared 9p
    directory, read while written, once gave ENODATA) and copied to LOG by a
    thread."""
    started = time.monotonic()
    p = subprocess.Popen([PY, "-m", "tracer.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         errors="backslashreplace", preexec_fn=on_tracer_cpus)
    ready, attached = threading.Event(), threading.Event()

    def copy() -> None:
        with open(log, "w") as f:
            for line in p.stdout or ():
                f.write(line)
                f.flush()
                if line.startswith("luotrace: tracing"):
                    p.ready_s = time.monotonic() - started  # type: ignore[attr-defined]
                    attached.set()
                    ready.set()
        ready.set()  # ended before attaching (its exit may not be reaped yet: poll() can still say running)

    threading.Thread(target=copy, daemon=True).start()
    if not ready.wait(900) or not attached.is_set() or p.poll() is not None:
        raise SystemExit(f"luotrace did not start: see {log}")
    return p


def note_ready(tag: str, rec: subprocess.Popen) -> None:
    """Seconds from a recorder's start to "tracing" (the VMM waits on that
    line, not on a sleep), kept in ready.json by TAG for the notes."""
    path = os.path.join(OUT, "ready.json")
    got = {}
    if os.path.exists(path):
        with open(path) as f:
            got = json.load(f)
    got[tag] = round(rec.ready_s, 3)  # type: ignore[attr-defined]
    with open(path, "w") as f:
        json.dump(got, f)


def jump(kdir: str, next_stage: int) -> None:
    from . import kexec
    with open(os.path.join(OUT, "stage"), "w") as f:
        f.write(str(next_stage))
    kexec.load(os.path.join(kdir, "bzImage"))
    with open(os.path.join(OUT, f"kexec-{next_stage}.json"), "w") as f:
        json.dump({"from_boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
                   "realtime_ns": time.time_ns()}, f)
    kexec.execute()
    raise SystemExit("kexec returned")  # only if the jump was refused


def only(part: str) -> bool:
    """LUOTRACE_VM_ONLY names one part (kexec, gmem) or is all."""
    return os.environ.get("LUOTRACE_VM_ONLY", "all") in ("all", part)


def stage2(kdir: str) -> None:
    if only("kexec"):
        kexec_selftests(kdir, 2, "kexec-untraced-2")
    start_recorder(os.path.join(OUT, "update-1.luo"), os.path.join(OUT, "update-1.log"))
    if only("kexec"):
        kexec_selftests(kdir, 1, "kexec-traced-1")
        sh([PY, "-m", "workloads.liveupdate", "--hold", "--json", os.path.join(OUT, "held.json"), *HELD])
    if only("gmem"):  # bpftrace counts beside the recorder, as in boot 1; top watching as an operator would
        start_top(os.path.join(OUT, "top-1.log"))
        with on_work_cpus():
            with_bpftrace(bpftrace_program("kvm_gmem_luo"), "bpftrace-gmem-update.json", lambda: sh(
                [PY, *GMEM, "--hold", "--json", os.path.join(OUT, "held-gmem.json"), *GMEM_HELD]))
    time.sleep(2)  # the recorder (and top) have flushed everything before the jump
    jump(kdir, 3)


# kho_restore_folio calls made by the handlers' retrieve and finish (discard):
# the folios luotrace counts from each file's incoming folio array
RESTORE_OPS = ("memfd_luo_retrieve", "memfd_luo_finish", "kvm_gmem_luo_retrieve", "kvm_gmem_luo_finish")
BPFTRACE_RESTORES = (",".join(f"kprobe:{f}" for f in RESTORE_OPS) + " { @in[tid] = 1; } "
                     + ",".join(f"kretprobe:{f}" for f in RESTORE_OPS) + " { delete(@in[tid]); } "
                     "kprobe:kho_restore_folio /@in[tid]/ { @folios = count(); }")


def stage3(kdir: str) -> None:
    # the new kernel's first start: cold (nothing of BCC or the headers in the page cache yet)
    rec = start_recorder(os.path.join(OUT, "update-2.luo"), os.path.join(OUT, "update-2.log"))
    note_ready("new kernel, cold", rec)

    # top in the new kernel: each retrieve against what the old kernel's recording says was preserved
    top = start_top(os.path.join(OUT, "top-2.log"), ["--before", os.path.join(OUT, "update-1.luo")]) \
        if only("gmem") else None

    def retrieves() -> None:
        if only("kexec"):
            kexec_selftests(kdir, 2, "kexec-traced-2")
            sh([PY, "-m", "workloads.liveupdate", "--retrieve", os.path.join(OUT, "held.json"), "--json",
                os.path.join(OUT, "retrieved.json")])
        if only("gmem"):
            sh([PY, *GMEM, "--retrieve", os.path.join(OUT, "held-gmem.json"), "--json",
                os.path.join(OUT, "retrieved-gmem.json")])
    with on_work_cpus():
        with_bpftrace(BPFTRACE_RESTORES, "bpftrace-restores.json", retrieves)
    time.sleep(1.5)  # top's next frames see the last finish
    for p in (rec, top):
        if p is not None:
            p.send_signal(signal.SIGINT)
    for p in (rec, top):
        if p is not None:
            p.wait(300)
    sh([PY, "-m", "tracer.cli", "report", "--json", os.path.join(OUT, "update-1.luo"),
        os.path.join(OUT, "update-2.luo")], os.path.join(OUT, "report-update.json"))
    sh([PY, "-m", "tracer.cli", "report", os.path.join(OUT, "update-1.luo"),
        os.path.join(OUT, "update-2.luo")], os.path.join(OUT, "report-update.txt"))
    sh([PY, "-m", "tracer.cli", "timeline", os.path.join(OUT, "update-1.luo"), os.path.join(OUT, "update-2.luo"),
        "-o", os.path.join(OUT, "timeline-update.json")])
    # started again, warm: compiling (the page cache holds BCC and the headers
    # now), then keeping the programs and opening them at the next start
    for tag in ("compiling", "keeping", "nothing changed"):
        os.environ["LUOTRACE_BPF_CACHE"] = "0" if tag == "compiling" else "1"
        warm = start_recorder(os.path.join(OUT, "warm.luo"), os.path.join(OUT, "warm.log"), extra=["--force"])
        note_ready(f"new kernel, warm, {tag}", warm)
        warm.send_signal(signal.SIGINT)
        warm.wait(300)


_HELD_VM = None


def hold_a_vm() -> None:
    """One KVM VM held for the whole boot.  Creating the first VM and
    destroying the last flip the preempt-notifier static key, a jump patched
    into __schedule; under TCG a vCPU then sometimes runs the patch's int3
    after it was replaced ("Oops: int3" at __schedule+0x413, the death of four
    lane runs in a row, each right after a driver's VMs went away).  With one
    VM held the key is flipped once, at boot, and never again."""
    global _HELD_VM
    from tracer.kernel.kvm import GmemError
    from tracer.kernel.backing import VM
    try:
        _HELD_VM = VM()
    except GmemError as e:
        print(f"inside: no VM held ({e}); the emulation may die of a patched static key", file=sys.stderr)


def main() -> None:
    # Every recorder here compiles its programs, as before they could be kept
    # between starts (tracer/attach/bpf_cache.py): the lane checks what it checked
    # before; the warm starts at the end of stage 3 keep and reuse them.
    os.environ["LUOTRACE_BPF_CACHE"] = "0"
    hold_a_vm()
    stage_file = os.path.join(OUT, "stage")
    stage = int(open(stage_file).read()) if os.path.exists(stage_file) else 1
    kdir = sys.argv[2] if len(sys.argv) > 2 else ""
    with open(os.path.join(OUT, "boots.txt"), "a") as f:
        f.write(f"{stage} {open('/proc/sys/kernel/random/boot_id').read().strip()} {time.time_ns()}\n")
    if stage == 2:
        return stage2(kdir)
    if stage == 3:
        return stage3(kdir)
    if only("kexec"):
        # memfd's vmbench first, on the fresh VM: a memfd preserve measured
        # after guest_memfds were used and freed ran 10-30x slower and kept
        # drifting (54 ms -> 0.5-1.9 s), which made its ratios meaningless
        vmbench(["memfd"])
    if os.environ.get("LUOTRACE_VM_ONLY", "all") == "all":
        single_kernel(kdir)
    if only("gmem"):
        gmem_single_kernel()
    if os.environ.get("LUOTRACE_VM_ONLY", "all") != "kexec":
        vmbench(["guest_memfd"])
    if kdir:
        if only("kexec"):
            kexec_selftests(kdir, 1, "kexec-untraced-1")
        jump(kdir, 2)


def single_kernel(kdir: str) -> None:
    info = {"kernel": platform.release(), "liveupdate": os.path.exists("/dev/liveupdate"),
            "kheaders": os.path.exists("/sys/kernel/kheaders.tar.xz"), "btf": os.path.exists("/sys/kernel/btf/vmlinux")}
    with open(os.path.join(OUT, "info.json"), "w") as f:
        json.dump(info, f)
    sh([PY, "-m", "tracer.cli", "doctor", "--json"], os.path.join(OUT, "doctor.json"))
    for tag, mode, strategy in (("light", "light", "auto"), ("folio", "folio", "auto"),
                                ("folio-kprobe", "folio", "kprobe"), ("folio-latency", "folio", "auto")):
        extra = ["--folio-latency"] if tag == "folio-latency" else []
        sh([PY, "-m", "tracer.cli", "record", "--mode", mode, "--strategy", strategy, *extra, "--handler", "memfd", "-o",
            os.path.join(OUT, f"{tag}.luo"), "--json", "--", PY, *DRIVER[:2], "--json",
            os.path.join(OUT, f"truth-{tag}.json"), *DRIVER[2:]], os.path.join(OUT, f"report-{tag}.json"))
    sh([PY, *DRIVER[:2], "--json", os.path.join(OUT, "truth-untraced.json"), *DRIVER[2:]])
    if kdir:
        selftests(kdir)
    side_by_side()


if __name__ == "__main__":
    OUT = sys.argv[1]
    main()
