"""Populate guest_memfds for real: ``python -m workloads.populate 64M 16M``.

Creates one VM and one guest_memfd (MMAP | INIT_SHARED) per size, pre-allocates
each with fallocate(KEEP_SIZE), and prints what it made as JSON (inode, kernel
dev, size, folios) so that tests and benchmarks know the ground truth.  Where
the host's KVM makes no guest_memfd (or $LUOTRACE_GMEM says so) the files are
stand-ins (tracer/kernel/standin.py), and "gmem" in the JSON says which.
Options: ``--json FILE`` writes it to a file; ``--hold S`` keeps the files open
for S seconds after populating; ``--punch`` punches a hole in the last page of
each file and allocates it again (page-cache churn on a live inode).
"""
from __future__ import annotations

import argparse
import sys
import time

from .gmem import VM, GmemError
from tracer.base.errors import LuotraceError
from tracer.base.units import PAGE_SIZE
from .truth import parse_size, write_truth


def _size_arg(s: str) -> int:
    try:
        return parse_size(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workloads.populate", description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="+", type=_size_arg, help="guest_memfd sizes, e.g. 64M 1G")
    ap.add_argument("--json", dest="json_path", help="write the ground truth here")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to keep the files open afterwards")
    ap.add_argument("--punch", action="store_true", help="punch and re-allocate the last page of each file")
    ap.add_argument("--repeat", type=int, default=1,
                    help="populate N times (punching the whole files in between); populate_ns is the median")
    args = ap.parse_args(argv)
    try:
        with VM() as vm:
            files = [vm.create_gmem(s) for s in args.sizes]
            times = []
            for r in range(max(1, args.repeat)):
                if r:
                    for f in files:
                        f.punch(0, f.size)
                t0 = time.monotonic_ns()
                for f in files:
                    f.populate()
                times.append(time.monotonic_ns() - t0)
            elapsed = sorted(times)[len(times) // 2]
            for f in files:
                if args.punch:
                    f.punch(f.size - PAGE_SIZE, PAGE_SIZE)
                    f.populate(f.size - PAGE_SIZE, PAGE_SIZE)
            truth = {"populate_ns": elapsed, "populate_runs_ns": times, "gmem": vm.backing.kind,
                     "files": [{"inode": f.ino, "dev": f.dev, "size_bytes": f.size,
                                "folios": f.size // PAGE_SIZE * max(1, args.repeat) + (1 if args.punch else 0)}
                               for f in files]}
            write_truth(truth, args.json_path)
            if args.hold:
                time.sleep(args.hold)
    except (GmemError, LuotraceError) as e:
        print(f"populate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
