"""Drives real guest_memfd preservations through /dev/liveupdate, on a kernel
carrying the guest_memfd LUO handler (the VM lane's patched 7.2).  Each
scenario is a LUO session of its own with a VM of its own: the VM file is
preserved beside its guest_memfds, which find it again in the next kernel
through the token it was preserved with.

    python -m workloads.gmem_luo --json truth.json keep cancel rejected hwpoison race
    python -m workloads.gmem_luo --hold --json held.json keep discard     # then kexec
    python -m workloads.gmem_luo --retrieve held.json --json after.json  # in the new kernel

Scenarios (SIZE overrides the size of the first guest_memfd, e.g. bench:256M):
  keep      two guest_memfds, 4 MiB allocated by fallocate and 2 MiB by host
            faults through mmap, a pattern on every page; kept (with --hold
            across the kexec, then retrieved and checked byte for byte)
  discard   a 1 MiB guest_memfd kept across the kexec and never retrieved:
            finish gives its folios back
  cancel    a 2 MiB guest_memfd, then the session is closed: unpreserve
  rejected  a guest_memfd of a private-memory VM (KVM_X86_SW_PROTECTED_VM):
            can_preserve says no, the preserve fails with ENOENT
  hwpoison  a 1 MiB guest_memfd with one page poisoned (MADV_HWPOISON): the
            preserve fails with EHWPOISON and unwinds what it preserved
  race      a 16 MiB guest_memfd with its first 4000 pages allocated while
            another process punches out and allocates again its last 96 pages,
            one fallocate() each, in a loop through the preserve: the review's
            race (folios added to a frozen inode by a call already under way)
  bench     one guest_memfd (256 MiB unless SIZE), allocated, no pattern:
            the preserve's time, for vmbench
  hold      the same, kept across the kexec and retrieved (no pattern
            check): the retrieve's time, for the retrieve benchmark
  novm      a 1 MiB guest_memfd whose VM file is not in the session: where
            preserve takes the VM token itself (the series' later
            revisions) it fails with ENOENT; the seed's freeze op would fail
            at the kexec instead, and without one the session is cancelled

Writes its ground truth as JSON: per guest_memfd the scenario, session,
token, VM token, inode, size, pages populated and the preserve's errno.
"""
from __future__ import annotations

import argparse
import errno as errno_mod
import json
import mmap
import os
import select
import sys
import time
from typing import Dict, List, Optional

from tracer.probes.events import errno_name  # names Linux errnos Python's errno module lacks (EHWPOISON)

from tracer.base.units import PAGE_SIZE
from tracer.kernel import kvm_abi as kabi
from .gmem import VM, GmemError, GmemFile
from .liveupdate import (_pattern, create_session, finish_session, hold, open_dev, preserve_fd, retrieve_fd,
                         retrieve_from, retrieve_session)
from .truth import parse_size, write_truth


SCENARIOS = ("keep", "discard", "cancel", "rejected", "hwpoison", "race", "bench", "novm", "hold")
HELD = ("keep", "discard", "hold")  # what --hold carries across the kexec
RACE_PAGES, RACE_POPULATED = 4096, 4000
# The racer touches pages RACE_POPULATED..RACE_PAGES-1 only, so pass 1 always
# counts more than 3840 folios and v1's folio array (vcalloc(count, 16 B)) is
# 16 pages: room for all 4096 entries.  v1's pass 2 writes one entry per folio
# it finds, so folios added between the passes stay inside the array instead
# of running past the vmalloc area (see the patch's notes).


def write_pattern(f: GmemFile, seed: int, pages: int) -> None:
    """8 bytes at the start of each of the first PAGES pages (a host fault
    allocates each page that is not there yet)."""
    with mmap.mmap(f.fd, f.size) as m:
        for p in range(pages):
            m[p * PAGE_SIZE:p * PAGE_SIZE + 8] = _pattern(seed, p * PAGE_SIZE)


def check_pattern(fd: int, size: int, seed: int, pages: int) -> int:
    """Pages of a retrieved guest_memfd whose content differs from what was written."""
    if os.fstat(fd).st_size != size:
        return pages
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
        return sum(m[p * PAGE_SIZE:p * PAGE_SIZE + 8] != _pattern(seed, p * PAGE_SIZE) for p in range(pages))


def poison_page(f: GmemFile, page: int) -> Optional[str]:
    """MADV_HWPOISON one page of F in a child (memory_failure may signal the
    process that maps it).  None if the page is now poisoned, else why not."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        msg = b""
        try:
            with mmap.mmap(f.fd, f.size) as m:
                m.madvise(kabi.MADV_HWPOISON, page * PAGE_SIZE, PAGE_SIZE)
        except OSError as e:
            msg = f"madvise(MADV_HWPOISON): {e.strerror}".encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    why = os.read(r, 512).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if why:
        return why
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) != 7:  # SIGBUS is what poisoning a mapped page may send
        return f"poisoning child killed by signal {os.WTERMSIG(status)}"
    return None


def start_racer(f: GmemFile, first: int, pages: int):
    """A process that punches PAGES pages from FIRST out of F and allocates
    them again, one call each, in a loop until told to stop; it reports how
    its calls went and when the last ones completed."""
    stop_r, stop_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(stop_w)
        os.close(res_r)
        counts = {"punched": 0, "added": 0, "refused": 0, "other": 0}
        adds_ns: List[int] = []
        first_refused_ns = None
        poll = select.poll()
        poll.register(stop_r, select.POLLIN)
        while not poll.poll(0):
            for call, what in ((f.punch, "punched"), (f.populate, "added")):
                try:
                    call(first * PAGE_SIZE, pages * PAGE_SIZE)
                    counts[what] += 1
                    if what == "added":
                        adds_ns = (adds_ns + [time.monotonic_ns()])[-8:]
                except GmemError as e:
                    if e.errno == errno_mod.EPERM:  # the inode is frozen
                        counts["refused"] += 1
                        first_refused_ns = first_refused_ns or time.monotonic_ns()
                    else:
                        counts["other"] += 1
        os.write(res_w, json.dumps({**counts, "last_adds_ns": adds_ns,
                                    "first_refused_ns": first_refused_ns}).encode())
        os._exit(0)
    os.close(stop_r)
    os.close(res_w)
    return pid, stop_w, res_r


def stop_racer(racer) -> dict:
    pid, stop_w, res_r = racer
    os.write(stop_w, b"x")
    os.close(stop_w)
    data = b""
    while chunk := os.read(res_r, 65536):
        data += chunk
    os.close(res_r)
    os.waitpid(pid, 0)
    return json.loads(data or b"{}")


class Run:
    """One driver run: its /dev/liveupdate, its sessions and its ground truth."""

    def __init__(self, dev: int):
        self.dev = dev
        self.truth: Dict[str, list] = {"files": [], "sessions": [], "skipped": []}
        self.keep_open: List[int] = []  # kept sessions (and their VMs' fds stay with the VM objects)
        self.vms: List[VM] = []

    def session(self, n: int, scenario: str, vm_type: int = kabi.KVM_X86_DEFAULT_VM):
        name = f"luotrace-gmem-{scenario}-{n}"
        vm = VM(vm_type=vm_type)
        self.vms.append(vm)
        sfd = create_session(self.dev, name)
        vm_token = 0x200 + 16 * n
        if scenario != "novm":
            preserve_fd(sfd, vm.fd, vm_token)
        self.truth["sessions"].append({"index": n, "name": name, "scenario": scenario, "vm_token": vm_token,
                                       "vm_type": vm_type})
        return sfd, vm, vm_token

    def preserve(self, sfd: int, f: GmemFile, token: int, rec: dict) -> Optional[int]:
        """Preserve F under TOKEN; the errno (or None) goes into REC with the time it took."""
        t0 = time.monotonic_ns()
        err = None
        try:
            preserve_fd(sfd, f.fd, token)
        except OSError as e:
            err = e.errno
        rec.update({"token": token, "inode": f.ino, "dev": f.dev, "size_bytes": f.size,
                    "errno": errno_name(-err) if err else None,
                    "preserve_start_ns": t0, "preserve_ns": time.monotonic_ns() - t0})
        self.truth["files"].append(rec)
        return err

    def scenario(self, n: int, spec: str) -> None:
        scenario, _, size_s = spec.partition(":")
        size = parse_size(size_s) if size_s else None
        if scenario == "rejected":
            return self.rejected(n, size or (1 << 20))
        sfd, vm, vm_token = self.session(n, scenario)
        base = {"session": n, "scenario": scenario, "vm_token": vm_token, "outcome": scenario}
        if scenario == "keep":
            files = [(size or (4 << 20), "fallocate"), (2 << 20, "fault")]
        elif scenario == "discard":
            files = [(size or (1 << 20), "fallocate")]
        elif scenario == "cancel":
            files = [(size or (2 << 20), "fallocate")]
        elif scenario in ("hwpoison", "novm"):
            files = [(size or (1 << 20), "fallocate")]
        elif scenario in ("bench", "hold"):
            files = [(size or (256 << 20), "fallocate")]
        else:  # race
            return self.race(n, sfd, vm, base)
        for i, (sz, how) in enumerate(files):
            f = vm.create_gmem(sz)
            seed = n * 100 + i
            if how == "fallocate":
                f.populate()
            if scenario not in ("bench", "hold"):
                write_pattern(f, seed, sz // PAGE_SIZE)
            rec = {**base, "seed": seed, "populate": how, "pages": sz // PAGE_SIZE}
            if scenario == "hwpoison":
                page = sz // PAGE_SIZE // 2
                why = poison_page(f, page)
                rec.update({"poisoned_page": page, "poison_error": why})
            self.preserve(sfd, f, vm_token + 1 + i, rec)
        if scenario in HELD:
            self.keep_open.append(sfd)
        else:
            os.close(sfd)  # closing a session unpreserves what it holds

    def rejected(self, n: int, size: int) -> None:
        with VM() as probe:
            types = probe.check_extension(kabi.KVM_CAP_VM_TYPES)
        if not types & (1 << kabi.KVM_X86_SW_PROTECTED_VM):
            self.truth["skipped"].append({"scenario": "rejected", "why": "no KVM_X86_SW_PROTECTED_VM VMs here"})
            return
        sfd, vm, vm_token = self.session(n, "rejected", kabi.KVM_X86_SW_PROTECTED_VM)
        f = vm.create_gmem(size, 0)  # a private VM's guest_memfd cannot be INIT_SHARED
        f.populate()
        self.preserve(sfd, f, vm_token + 1, {"session": n, "scenario": "rejected", "vm_token": vm_token,
                                              "outcome": "rejected", "populate": "fallocate",
                                              "pages": size // PAGE_SIZE, "seed": None})
        os.close(sfd)

    def race(self, n: int, sfd: int, vm: VM, base: dict) -> None:
        f = vm.create_gmem(RACE_PAGES * PAGE_SIZE)
        f.populate(0, RACE_POPULATED * PAGE_SIZE)
        racer = start_racer(f, RACE_POPULATED, RACE_PAGES - RACE_POPULATED)
        time.sleep(0.2)  # the racer is in its loop
        rec = {**base, "seed": None, "populate": "fallocate", "pages": RACE_POPULATED,
               "race_pages": [RACE_POPULATED, RACE_PAGES]}
        self.preserve(sfd, f, base["vm_token"] + 1, rec)
        time.sleep(0.05)
        stats = stop_racer(racer)
        end = rec["preserve_start_ns"] + rec["preserve_ns"]
        stats["adds_completed_during_preserve"] = sum(rec["preserve_start_ns"] <= t <= end
                                                      for t in stats.get("last_adds_ns", []))
        rec["racer"] = stats
        os.close(sfd)

    def close(self, hold_sessions: bool) -> None:
        if hold_sessions:
            # the VM and guest_memfd fds may close: the sessions hold the files
            for vm in self.vms:
                vm.close()
            hold(self.keep_open)
            return
        for fd in self.keep_open:
            os.close(fd)
        for vm in self.vms:
            vm.close()


def retrieve_all(dev: int, before: dict) -> dict:
    """In the next kernel: take back every held session; retrieve and check the
    kept guest_memfds (each brings its VM back through its token), leave the
    discarded ones alone; finish every session."""
    out: Dict[str, list] = {"files": [], "sessions": []}
    for s in before["sessions"]:
        if s["scenario"] not in HELD:
            continue
        t0 = time.monotonic_ns()
        sfd = retrieve_session(dev, s["name"])
        files = [f for f in before["files"] if f["session"] == s["index"] and not f["errno"]]
        vm_fd = None
        for f in files:
            if f["scenario"] not in ("keep", "hold"):
                out["files"].append({**f, "retrieved_inode": None})
                continue
            t1, wall = time.monotonic_ns(), time.time_ns()
            fd = retrieve_fd(sfd, f["token"])
            took = time.monotonic_ns() - t1
            if vm_fd is None:  # already retrieved by the guest_memfd's handler: the same VM comes back
                vm_fd = retrieve_fd(sfd, s["vm_token"])
            out["files"].append({**f, "retrieved_inode": os.fstat(fd).st_ino, "retrieve_ns": took,
                                 "retrieve_realtime_ns": wall,
                                 "bad_pages": (check_pattern(fd, f["size_bytes"], f["seed"], f["pages"])
                                               if f["scenario"] == "keep" else None)})
            os.close(fd)
        finish_session(sfd)
        os.close(sfd)
        if vm_fd is not None:
            os.close(vm_fd)
        out["sessions"].append({"index": s["index"], "name": s["name"], "scenario": s["scenario"],
                                "files": len(files), "retrieve_and_finish_ns": time.monotonic_ns() - t0})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workloads.gmem_luo", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__[__doc__.index("Scenarios"):__doc__.index("Writes its")])
    ap.add_argument("scenarios", nargs="*", help="SCENARIO[:SIZE] ... (see below)")
    ap.add_argument("--json", dest="json_path", help="write the ground truth here (default: stdout)")
    ap.add_argument("--hold", action="store_true", help="keep the keep/discard sessions open in a child (for a kexec)")
    ap.add_argument("--retrieve", metavar="TRUTH", help="retrieve the sessions a --hold run wrote to TRUTH")
    args = ap.parse_args(argv)
    if not args.scenarios and not args.retrieve:
        ap.error("give scenarios or --retrieve TRUTH")
    for s in args.scenarios:
        name, _, size = s.partition(":")
        if name not in SCENARIOS:
            ap.error(f"unknown scenario '{name}' (one of {', '.join(SCENARIOS)})")
        if size:
            try:
                parse_size(size)
            except ValueError as e:
                ap.error(str(e))
    dev = open_dev("gmem_luo")
    if dev < 0:
        return 2
    if args.retrieve:
        return retrieve_from(dev, args.retrieve, args.json_path, retrieve_all)
    run = Run(dev)
    try:
        for n, spec in enumerate(args.scenarios):
            run.scenario(n, spec)
    except GmemError as e:
        print(f"gmem_luo: {e.strerror}", file=sys.stderr)
        return 2
    write_truth(run.truth, args.json_path)
    os.close(dev)  # /dev/liveupdate admits one opener at a time
    run.close(args.hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
