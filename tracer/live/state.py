"""The service's state directory: one recording per boot, so that the old
kernel's half of an update, written up to kernel_kexec(), is read again by
the next boot's serve and exported beside the live numbers.

A scrape interval is no match for a kexec: the preserve side of an update
happens seconds before the jump, and the serve that traced it dies with the
old kernel.  The recording survives (it is fsynced at the kexec), so after the
boot the numbers are exported from it, labelled with the boot and kernel they
belong to, for the whole of the boot it brought up.  Retention is
bounded by count and bytes; the current boot's recording is never removed.
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from tracer.kernel import clock
from tracer.base.errors import LuotraceError

PREFIX = "boot-"
SUFFIX = ".luo"
KEEP = 8  # recordings kept (this boot's included)
MAX_BYTES = 512 << 20  # bytes of recordings kept
_NAME = re.compile(r"^boot-([0-9a-f-]{1,64})-(\d{8}T\d{6})(?:-\d+)?\.luo$")


@dataclass
class EarlierBoot:
    """The previous boot's recording, which saw a kexec, and its report."""
    path: str
    boot_id: str
    kernel: str
    report: dict


class StateDir:
    def __init__(self, path: str, keep: int = KEEP, max_bytes: int = MAX_BYTES,
                 progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        try:
            os.makedirs(path, mode=0o750, exist_ok=True)
        except OSError as e:
            raise LuotraceError(f"cannot create --state-dir {path}: {e.strerror}",
                                "give a writable directory (the service uses /var/lib/luotrace)") from None
        if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
            raise LuotraceError(f"--state-dir {path} is not a writable directory",
                                "give a writable directory (the service uses /var/lib/luotrace)")
        if keep < 1 or max_bytes < 1:
            raise LuotraceError("--state-keep and --state-max-bytes must be at least 1", "raise them")
        self.path, self.keep, self.max_bytes, self.progress = path, keep, max_bytes, progress
        self.boot_id = clock.boot_id() or "unknown"

    def recordings(self) -> List[str]:
        """luotrace's recordings in the directory, oldest first (by mtime)."""
        out = []
        for name in os.listdir(self.path):
            p = os.path.join(self.path, name)
            if _NAME.match(name) and os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
        return sorted(out, key=lambda p: (os.stat(p).st_mtime_ns, p))

    def new_recording(self) -> str:
        """A fresh path for this boot's recording (a restarted service starts another)."""
        stem = f"{PREFIX}{self.boot_id}-{time.strftime('%Y%m%dT%H%M%S')}"
        path, n = os.path.join(self.path, stem + SUFFIX), 1
        while os.path.exists(path):
            path, n = os.path.join(self.path, f"{stem}-{n}{SUFFIX}"), n + 1
        return path

    def previous_boot(self) -> Optional[EarlierBoot]:
        """The update that brought this boot up: the newest recording of
        another boot, if it saw a kexec.  None if it did not (that boot ended
        in a reboot or a stopped service); an older recording is never this
        boot's update."""
        from tracer.analysis.replay import replay
        for p in reversed(self.recordings()):
            m = _NAME.match(os.path.basename(p))
            if not m or m.group(1) == self.boot_id:
                continue
            try:
                rep = replay(p)
            except LuotraceError as e:
                self.progress(f"luotrace: cannot read the previous boot's recording: {e.args[0] if e.args else e}")
                return None
            boot = (rep.get("update") or {}).get("boot_id")
            if not rep.get("kexec_ns") or not boot or boot == self.boot_id:
                self.progress(f"luotrace: the previous boot's recording {p} saw no kexec: no update to export")
                return None
            return EarlierBoot(p, boot, str((rep.get("recording") or {}).get("kernel") or "unknown"), rep)
        return None

    def prune(self, current: Optional[str] = None) -> List[str]:
        """Remove the oldest recordings beyond KEEP files or MAX_BYTES, never CURRENT."""
        paths = self.recordings()
        sizes = {p: os.stat(p).st_size for p in paths}
        total = sum(sizes.values())
        removed: List[str] = []
        for p in paths:
            if len(paths) - len(removed) <= self.keep and total <= self.max_bytes:
                break
            if current and os.path.abspath(p) == os.path.abspath(current):
                continue
            try:
                os.unlink(p)
            except OSError as e:
                self.progress(f"luotrace: cannot remove old recording {p}: {e.strerror}")
                continue
            removed.append(p)
            total -= sizes[p]
        if removed:
            self.progress(f"luotrace: removed {len(removed)} old recording(s) from {self.path} "
                          f"(keeping at most {self.keep} and {self.max_bytes >> 20} MiB)")
        return removed
