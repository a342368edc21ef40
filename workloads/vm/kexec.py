"""Load the next kernel with kexec_file_load and jump into it: what the LUO
selftests' do_kexec.sh does with kexec-tools (``kexec -l -s --reuse-cmdline``,
then ``kexec -e``), without needing kexec-tools in the guest.

kexec_file_load is the path that hands the KHO state to the next kernel
(kho_fill_kimage); the jump itself runs liveupdate_reboot(), which freezes
every preserved file.

    python -m workloads.vm.kexec BZIMAGE [--load-only]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

from . import kexec_abi as abi

_libc = ctypes.CDLL(None, use_errno=True)


def load(bzimage: str, cmdline: str | None = None) -> None:
    """Stage the next kernel, reusing this boot's command line unless told otherwise."""
    if cmdline is None:
        with open("/proc/cmdline") as f:
            cmdline = f.read().strip()
    raw = cmdline.encode() + b"\0"
    fd = os.open(bzimage, os.O_RDONLY)
    try:
        rc = _libc.syscall(abi.NR_KEXEC_FILE_LOAD, fd, -1, ctypes.c_ulong(len(raw)), ctypes.c_char_p(raw),
                           ctypes.c_ulong(abi.KEXEC_FILE_NO_INITRAMFS))
    finally:
        os.close(fd)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"kexec_file_load({bzimage}): {os.strerror(err)}")


def execute() -> None:
    """Jump into the staged kernel.  Returns only if the jump failed (e.g. a LUO freeze refused it)."""
    os.sync()  # reboot(KEXEC) does not sync: recordings and results must reach the shared directory first
    if _libc.reboot(abi.LINUX_REBOOT_CMD_KEXEC) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"reboot(KEXEC): {os.strerror(err)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workloads.vm.kexec", description=__doc__.splitlines()[0])
    ap.add_argument("bzimage")
    ap.add_argument("--load-only", action="store_true", help="stage the kernel, do not jump")
    args = ap.parse_args(argv)
    try:
        load(args.bzimage)
        if not args.load_only:
            execute()
    except OSError as e:
        print(f"kexec: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
