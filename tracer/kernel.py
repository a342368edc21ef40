"""Facts about the running kernel that decide what luotrace can do here.

Features are detected, never inferred from the version: BTF present, symbol in
kallsyms, tracepoint format readable, fentry supported, bpf_stats writable.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from typing import Dict, Optional, Set

from .btf import BTF
from .errors import LuotraceError

DEBUGFS = "/sys/kernel/debug"
TRACEFS = "/sys/kernel/tracing"
BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def btf_path() -> str:
    """``LUOTRACE_BTF`` overrides the BTF location (used by tests of the no-BTF error)."""
    return os.environ.get("LUOTRACE_BTF", "/sys/kernel/btf/vmlinux")


@functools.lru_cache(maxsize=None)
def _parsed_btf(path: str) -> BTF:
    return BTF.from_file(path)


def btf() -> BTF:
    """The running kernel's BTF, parsed once per process: layout resolution,
    fentry support and fentry signatures all read it at start-up.  Raises
    BTFError when it is missing or corrupt."""
    return _parsed_btf(btf_path())


def release() -> str:
    return platform.release()


def require_root() -> None:
    if os.geteuid() != 0:
        raise LuotraceError("luotrace needs root to load BPF programs (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)",
                            "run it with sudo")


def require_btf() -> str:
    path = btf_path()
    if not os.path.exists(path):
        raise LuotraceError(f"no kernel BTF at {path}: luotrace resolves struct offsets from it",
                            "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    return path


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == path for line in f)
    except OSError:
        return False


def ensure_tracefs() -> Optional[str]:
    """Mount debugfs and tracefs if needed (BCC reads tracepoint formats under
    /sys/kernel/debug/tracing).  Returns None when ready, or why not."""
    problems = []
    for fstype, path in (("debugfs", DEBUGFS), ("tracefs", TRACEFS)):
        if _mounted(path):
            continue
        r = subprocess.run(["mount", "-t", fstype, fstype, path], capture_output=True, text=True)
        if r.returncode != 0 and not _mounted(path):
            problems.append(f"mount -t {fstype} {path}: {r.stderr.strip() or 'failed'}")
    if not os.path.exists(os.path.join(DEBUGFS, "tracing", "events")):
        problems.append(f"{DEBUGFS}/tracing/events missing")
    return "; ".join(problems) or None


def tracepoint_exists(category: str, event: str) -> bool:
    return os.path.exists(os.path.join(DEBUGFS, "tracing", "events", category, event, "format"))


_kallsyms_cache: Optional[Set[str]] = None


def kallsyms_functions() -> Set[str]:
    """Names of text symbols (kprobe-able candidates) in /proc/kallsyms."""
    global _kallsyms_cache
    if _kallsyms_cache is None:
        names: Set[str] = set()
        try:
            with open("/proc/kallsyms") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":
                        names.add(parts[2])
        except OSError:
            pass
        _kallsyms_cache = names
    return _kallsyms_cache


def kprobes_enabled() -> bool:
    """Without CONFIG_KPROBES neither kprobe_events nor the kprobe PMU exist."""
    return (os.path.exists("/sys/bus/event_source/devices/kprobe")
            or os.path.exists(os.path.join(TRACEFS, "kprobe_events"))
            or os.path.exists(os.path.join(DEBUGFS, "tracing", "kprobe_events")))


def set_bpf_stats(on: bool) -> Optional[int]:
    """Enable kernel.bpf_stats_enabled; returns the previous value to restore."""
    try:
        with open(BPF_STATS) as f:
            prev = int(f.read().strip() or 0)
        with open(BPF_STATS, "w") as f:
            f.write("1" if on else "0")
        return prev
    except (OSError, ValueError):
        return None


def restore_bpf_stats(prev: Optional[int]) -> None:
    if prev is None:
        return
    try:
        with open(BPF_STATS, "w") as f:
            f.write(str(prev))
    except OSError:
        pass


def prog_stats(fd: int) -> Dict[str, int]:
    """run_time_ns / run_cnt of a loaded program, from its fdinfo."""
    out = {"run_time_ns": 0, "run_cnt": 0, "prog_id": 0}
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in out:
                    out[k] = int(v.strip())
    except (OSError, ValueError):
        pass
    return out
