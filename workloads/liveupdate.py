"""Drives real LUO preservations through /dev/liveupdate (Linux 7.2 with
CONFIG_LIVEUPDATE): sessions of memfds of known sizes and contents, one sparse
(memfd_luo fills its holes), cancelled by closing the session or kept; and the
error cases, a hugetlb memfd and a file no handler takes.

    python -m workloads.liveupdate --json truth.json keep:4M,1M:sparse cancel:2M errors
    python -m workloads.liveupdate --hold --json truth.json keep:4M,1M:sparse   # then kexec
    python -m workloads.liveupdate --retrieve truth.json --json after.json     # in the new kernel

Prints (or writes) its ground truth: per file the session, token, inode, size
and pages, per error case the errno.  ``--hold`` leaves a child holding the
kept sessions open (closing a session unpreserves it), as a VMM would across
the kexec; ``--retrieve`` takes those sessions back in the next kernel,
checks every byte written before the update and finishes them.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import sys
import tempfile
import time
from typing import Dict, List

from tracer.probes.events import errno_name  # names Linux errnos Python's errno module lacks

from . import liveupdate_abi as abi
from tracer.base.units import PAGE_SIZE

from .truth import parse_size, write_truth


MFD_HUGETLB = 0x0004


class LuoError(OSError):
    """A /dev/liveupdate call failed."""


def create_session(dev_fd: int, name: str) -> int:
    buf = bytearray(abi.SESSION_STRUCT.pack(abi.SESSION_STRUCT.size, -1, name.encode()[:63]))
    fcntl.ioctl(dev_fd, abi.LIVEUPDATE_IOCTL_CREATE_SESSION, buf)
    return abi.SESSION_STRUCT.unpack(buf)[1]


def preserve_fd(session_fd: int, fd: int, token: int) -> None:
    buf = bytearray(abi.FD_STRUCT.pack(abi.FD_STRUCT.size, fd, token))
    fcntl.ioctl(session_fd, abi.LIVEUPDATE_SESSION_PRESERVE_FD, buf)


def retrieve_session(dev_fd: int, name: str) -> int:
    buf = bytearray(abi.SESSION_STRUCT.pack(abi.SESSION_STRUCT.size, -1, name.encode()[:63]))
    fcntl.ioctl(dev_fd, abi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, buf)
    return abi.SESSION_STRUCT.unpack(buf)[1]


def retrieve_fd(session_fd: int, token: int) -> int:
    buf = bytearray(abi.FD_STRUCT.pack(abi.FD_STRUCT.size, -1, token))
    fcntl.ioctl(session_fd, abi.LIVEUPDATE_SESSION_RETRIEVE_FD, buf)
    return abi.FD_STRUCT.unpack(buf)[1]


def finish_session(session_fd: int) -> None:
    fcntl.ioctl(session_fd, abi.LIVEUPDATE_SESSION_FINISH, bytearray(abi.FINISH_STRUCT.pack(abi.FINISH_STRUCT.size, 0)))


def open_dev(prog: str) -> int:
    """/dev/liveupdate, or -1 after a one-line reason on stderr."""
    try:
        return os.open(abi.DEV, os.O_RDWR)
    except OSError as e:
        print(f"{prog}: open {abi.DEV}: {e.strerror} (kernel without CONFIG_LIVEUPDATE, or no liveupdate=1?)",
              file=sys.stderr)
        return -1


def retrieve_from(dev: int, truth_path: str, json_path, retrieve) -> int:
    """--retrieve TRUTH: RETRIEVE(dev, what the --hold run wrote) -> the new truth."""
    with open(truth_path) as f:
        before = json.load(f)
    write_truth(retrieve(dev, before), json_path)
    return 0


def _pattern(seed: int, off: int) -> bytes:
    return (seed * 1_000_003 + off).to_bytes(8, "little")


def make_memfd(size: int, sparse: bool, seed: int) -> int:
    fd = os.memfd_create(f"luotrace-{seed}", 0)
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as m:
        step = 2 * PAGE_SIZE if sparse else PAGE_SIZE  # sparse: every other page is a hole
        for off in range(0, size, step):
            m[off:off + 8] = _pattern(seed, off)
    return fd


def check_memfd(fd: int, size: int, sparse: bool, seed: int) -> int:
    """Pages whose content differs from what make_memfd wrote (holes read as zeros)."""
    if os.fstat(fd).st_size != size:
        return size // PAGE_SIZE
    bad = 0
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
        for off in range(0, size, PAGE_SIZE):
            hole = sparse and (off // PAGE_SIZE) % 2 == 1
            if m[off:off + 8] != (bytes(8) if hole else _pattern(seed, off)):
                bad += 1
    return bad


def retrieve_all(dev: int, before: dict) -> dict:
    """Take back every kept session of a --hold run, verify, finish."""
    out: Dict[str, List[dict]] = {"files": [], "sessions": []}
    by_session: Dict[int, List[dict]] = {}
    for f in before["files"]:
        if f["outcome"] == "keep":
            by_session.setdefault(f["session"], []).append(f)
    for n, files in sorted(by_session.items()):
        name = f"luotrace-keep-{n}"
        t0 = time.monotonic_ns()
        sfd = retrieve_session(dev, name)
        for f in files:
            t1, wall = time.monotonic_ns(), time.time_ns()
            fd = retrieve_fd(sfd, f["token"])
            took = time.monotonic_ns() - t1
            out["files"].append({**f, "retrieved_inode": os.fstat(fd).st_ino, "retrieve_ns": took, "retrieve_realtime_ns": wall,
                                 "bad_pages": check_memfd(fd, f["size_bytes"], f["sparse"], f["seed"])})
            os.close(fd)
        finish_session(sfd)
        os.close(sfd)
        out["sessions"].append({"index": n, "name": name, "files": len(files),
                                "retrieve_and_finish_ns": time.monotonic_ns() - t0})
    return out


def hold(fds: List[int]) -> None:
    """Fork a child that keeps the sessions open until the kexec; the parent returns."""
    if os.fork() == 0:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(devnull, std)
        while True:
            time.sleep(60)
    for fd in fds:
        os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workloads.liveupdate", description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="*", help="keep:SIZE[:sparse],... | cancel:SIZE,... | errors")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--hold", action="store_true", help="keep the kept sessions open in a child (for a kexec)")
    ap.add_argument("--retrieve", metavar="TRUTH", help="retrieve the kept sessions a --hold run wrote to TRUTH")
    args = ap.parse_args(argv)
    if not args.sessions and not args.retrieve:
        ap.error("give sessions to preserve or --retrieve TRUTH")
    dev = open_dev("liveupdate")
    if dev < 0:
        return 2
    if args.retrieve:
        return retrieve_from(dev, args.retrieve, args.json_path, retrieve_all)
    truth: Dict[str, List[dict]] = {"files": [], "errors": [], "sessions": []}
    kept = []
    token = 0x100
    for n, spec in enumerate(args.sessions):
        if spec == "errors":
            sfd = create_session(dev, f"luotrace-errors-{n}")
            cases = []
            try:
                cases.append(("hugetlb memfd", os.memfd_create("luotrace-huge", MFD_HUGETLB)))
            except OSError as e:
                truth["errors"].append({"case": "hugetlb memfd", "errno": errno_name(-(e.errno or 0)),
                                        "stage": "memfd_create"})
            tmp = tempfile.TemporaryFile()
            cases.append(("regular file", tmp.fileno()))
            for what, fd in cases:
                token += 1
                try:
                    preserve_fd(sfd, fd, token)
                    truth["errors"].append({"case": what, "errno": None})
                except OSError as e:
                    truth["errors"].append({"case": what, "errno": errno_name(-(e.errno or 0)),
                                            "inode": os.fstat(fd).st_ino})
            os.close(sfd)
            continue
        outcome, _, files = spec.partition(":")
        sfd = create_session(dev, f"luotrace-{outcome}-{n}")
        for i, f in enumerate(files.split(",")):
            size_s, _, flag = f.partition(":")
            size = parse_size(size_s)
            fd = make_memfd(size, flag == "sparse", n * 100 + i)
            token += 1
            t0 = time.monotonic_ns()
            preserve_fd(sfd, fd, token)
            took = time.monotonic_ns() - t0
            truth["files"].append({"session": n, "outcome": outcome, "token": token, "inode": os.fstat(fd).st_ino,
                                   "seed": n * 100 + i,
                                   "size_bytes": size, "pages": size // PAGE_SIZE, "sparse": flag == "sparse",
                                   "preserve_ns": took})
            kept.append(fd)
        truth["sessions"].append({"index": n, "outcome": outcome})
        if outcome == "cancel":
            os.close(sfd)  # closing the session unpreserves its files
        else:
            kept.append(sfd)
    write_truth(truth, args.json_path)
    os.close(dev)  # /dev/liveupdate admits one opener at a time
    if args.hold:
        hold(kept)
        return 0
    for fd in kept:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
