"""Clock anchors that put recordings made on either side of a kexec on one
time axis.

Event timestamps are CLOCK_MONOTONIC (bpf_ktime_get_ns), which restarts at
zero in the new kernel.  Each recording stores anchors: CLOCK_MONOTONIC read
together with CLOCK_REALTIME and, on x86-64, the CPU's time-stamp counter.
The TSC keeps counting through a kexec (only a reset clears it), so it joins
two boots to within microseconds; CLOCK_REALTIME is the fallback, and it is
only as good as the new kernel's wall clock at boot (the RTC: 1 s steps,
unless NTP has run).
"""
from __future__ import annotations

import ctypes
import mmap
import platform
import time
from typing import Callable, Optional, Tuple

# rdtsc; shl rdx, 32; or rax, rdx; ret  -- the 64-bit counter in rax.
_RDTSC_X86_64 = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])
_rdtsc: Optional[Callable[[], int]] = None
_page: Optional[mmap.mmap] = None


def _load_rdtsc() -> Optional[Callable[[], int]]:
    global _rdtsc, _page
    if _rdtsc is not None or platform.machine() != "x86_64":
        return _rdtsc
    try:
        _page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):  # W^X policy: no TSC anchors, REALTIME only
        return None
    _page.write(_RDTSC_X86_64)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(_page))
    _rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    return _rdtsc


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def anchor() -> dict:
    """CLOCK_MONOTONIC with CLOCK_REALTIME and the TSC read beside it; the
    tightest of a few tries (the reads bracket the counter)."""
    rd = _load_rdtsc()
    best: Optional[Tuple[int, int, int, int]] = None
    for _ in range(5):
        m0 = time.monotonic_ns()
        t = rd() if rd else 0
        real = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[1] - best[0]:
            best = (m0, m1, t, real)
    m0, m1, t, real = best  # type: ignore[misc]
    d = {"monotonic_ns": (m0 + m1) // 2, "realtime_ns": real, "uncertainty_ns": m1 - m0}
    if rd:
        d["tsc"] = t
    return d


def tsc_per_ns(a: dict, b: dict) -> Optional[float]:
    """TSC rate from two anchors of one boot (seconds apart: the BPF compile)."""
    if "tsc" not in a or "tsc" not in b or b["monotonic_ns"] - a["monotonic_ns"] < 100_000_000:
        return None
    rate = (b["tsc"] - a["tsc"]) / (b["monotonic_ns"] - a["monotonic_ns"])
    return rate if rate > 0 else None


# A TSC-based offset further than this from the REALTIME one means the counter
# did not survive (a reset rather than a kexec, or an unstable TSC).
TSC_SANITY_NS = 5_000_000_000


def offset(first: dict, later: dict) -> Tuple[int, str]:
    """Nanoseconds to add to ``later``'s CLOCK_MONOTONIC timestamps to put them
    on ``first``'s, and which clock gave it ("same boot", "tsc", "realtime").
    Arguments are recording headers' ``clock`` objects."""
    if first.get("boot_id") and first.get("boot_id") == later.get("boot_id"):
        return 0, "same boot"
    a1, a2 = first.get("anchors") or [], later.get("anchors") or []
    if not a1 or not a2:
        return (later["base_realtime_ns"] - first["base_realtime_ns"]
                - (later["base_monotonic_ns"] - first["base_monotonic_ns"])), "realtime"
    x, y = a1[-1], a2[-1]
    by_real = (y["realtime_ns"] - x["realtime_ns"]) - (y["monotonic_ns"] - x["monotonic_ns"])
    rate = tsc_per_ns(a1[0], a1[-1]) or tsc_per_ns(a2[0], a2[-1])
    if rate and "tsc" in x and "tsc" in y and y["tsc"] > x["tsc"]:
        by_tsc = round((y["tsc"] - x["tsc"]) / rate) - (y["monotonic_ns"] - x["monotonic_ns"])
        if abs(by_tsc - by_real) <= TSC_SANITY_NS:
            return by_tsc, "tsc"
    return by_real, "realtime"
