"""Facts about the running kernel that decide what luotrace can do here.

Features are detected, never inferred from the version: BTF present, symbol in
kallsyms, tracepoint format readable, fentry supported, bpf_stats writable.
"""
from __future__ import annotations

import functools
import ctypes
import os
import struct
import platform
import subprocess
from typing import Dict, Optional, Set

from tracer.kernel.btf import BTF
from tracer.base.errors import LuotraceError

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


def mounted(path: str) -> bool:
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
        if mounted(path):
            continue
        r = subprocess.run(["mount", "-t", fstype, fstype, path], capture_output=True, text=True)
        if r.returncode != 0 and not mounted(path):
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


# bpf(2) ABI, include/uapi/linux/bpf.h (Linux 5.8+): BPF_ENABLE_STATS returns
# an fd; run-time statistics are collected while any such fd is open, and
# the kernel drops it when the process dies, whatever killed it.
SYS_BPF_X86_64 = 321
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


@functools.lru_cache(maxsize=None)
def libc() -> ctypes.CDLL:
    """The C library, opened on first use (never at import), with errno kept
    and the prototypes whose 64-bit arguments ctypes must not narrow."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return lib


def bpf(cmd: int, attr, what: str = "") -> int:
    """The bpf(2) system call with ATTR (a ctypes buffer, its size the
    attr's): its result, or OSError naming WHAT."""
    r = libc().syscall(SYS_BPF_X86_64, cmd, attr, ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({what or cmd}): {os.strerror(e)}")
    return r


def enable_bpf_stats() -> Optional[int]:
    """An fd that keeps BPF run-time statistics on for as long as this
    process holds it (never the global sysctl, which another recorder or a
    SIGKILL would leave wrong); None where the kernel refuses."""
    try:
        return bpf(BPF_ENABLE_STATS, ctypes.create_string_buffer(struct.pack("<I", BPF_STATS_RUN_TIME), 8))
    except OSError:
        return None


def bpf_stats_on() -> bool:
    """Statistics are being collected now (an fd somewhere, or the sysctl)."""
    try:
        with open(BPF_STATS) as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


class BpfStats:
    """Holds a BPF_ENABLE_STATS fd from open() to close(); ``on`` says whether
    run-time statistics are being collected (by this fd or already by the
    sysctl)."""

    def __init__(self) -> None:
        self.fd = enable_bpf_stats()
        self.on = self.fd is not None or bpf_stats_on()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "BpfStats":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prog_stats(fd: int, pid: str = "self") -> Dict[str, int]:
    """run_time_ns / run_cnt of a loaded program, and its recursion_misses:
    runs the kernel skipped because this CPU was already inside BPF
    (kernel/trace/bpf_trace.c trace_call_bpf: bpf_prog_active; a map syscall
    holds it too, and on a preemptible kernel it stays held while its task is
    preempted, so any kprobe or perf tracepoint program on that CPU is
    skipped meanwhile).  From the program's fdinfo (kernel/bpf/syscall.c
    bpf_prog_show_fdinfo); PID's fd (another process's program, for a
    referee's counts).  Zeros for an fd that is no program."""
    out = {"run_time_ns": 0, "run_cnt": 0, "recursion_misses": 0, "prog_id": 0}
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in out:
                    out[k] = int(v.strip())
    except (OSError, ValueError):
        pass
    return out
