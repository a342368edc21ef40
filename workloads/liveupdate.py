"""Drives real LUO preservations through /dev/liveupdate (Linux 7.2 with
CONFIG_LIVEUPDATE): sessions of memfds of known sizes and contents, one sparse
(memfd_luo fills its holes), cancelled by closing the session or kept; and the
error cases, a hugetlb memfd and a file no handler takes.

    python -m workloads.liveupdate --json truth.json keep:4M,1M:sparse cancel:2M errors

Prints (or writes) its ground truth: per file the session, token, inode, size
and pages, per error case the errno.
"""
from __future__ import annotations

import argparse
import errno as errno_mod
import fcntl
import mmap
import os
import sys
import tempfile
import time
from typing import Dict, List

from . import liveupdate_abi as abi
from .truth import parse_size, write_truth

PAGE = 4096
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


def make_memfd(size: int, sparse: bool, seed: int) -> int:
    fd = os.memfd_create(f"luotrace-{seed}", 0)
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as m:
        step = 2 * PAGE if sparse else PAGE  # sparse: every other page is a hole
        for off in range(0, size, step):
            m[off:off + 8] = (seed * 1_000_003 + off).to_bytes(8, "little")
    return fd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workloads.liveupdate", description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="keep:SIZE[:sparse],... | cancel:SIZE,... | errors")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    try:
        dev = os.open(abi.DEV, os.O_RDWR)
    except OSError as e:
        print(f"liveupdate: open {abi.DEV}: {e.strerror} (kernel without CONFIG_LIVEUPDATE?)", file=sys.stderr)
        return 2
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
                truth["errors"].append({"case": "hugetlb memfd", "errno": errno_mod.errorcode[e.errno],
                                        "stage": "memfd_create"})
            tmp = tempfile.TemporaryFile()
            cases.append(("regular file", tmp.fileno()))
            for what, fd in cases:
                token += 1
                try:
                    preserve_fd(sfd, fd, token)
                    truth["errors"].append({"case": what, "errno": None})
                except OSError as e:
                    truth["errors"].append({"case": what, "errno": errno_mod.errorcode.get(e.errno, str(e.errno)),
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
                                   "size_bytes": size, "pages": size // PAGE, "sparse": flag == "sparse",
                                   "preserve_ns": took})
            kept.append(fd)
        truth["sessions"].append({"index": n, "outcome": outcome})
        if outcome == "cancel":
            os.close(sfd)  # closing the session unpreserves its files
        else:
            kept.append(sfd)
    write_truth(truth, args.json_path)
    for fd in kept:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
