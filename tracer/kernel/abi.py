"""The binary interface between luotrace's BPF programs and Python, written
once: the event record, its kinds and flags, the per-CPU counters and the
key marker of the retrieve side.  bpf/luotrace.h does not define them: the
loader puts ``header()`` in front of every program it compiles, the numpy
dtype is built from the same table, and tests/test_abi.py compiles the header
with gcc and checks every offset of ``struct luo_event`` against the dtype.
bpf/abi.h is the same text, checked in for people reading the C (a test
keeps it equal; regenerate with ``python -m tracer.kernel.abi > bpf/abi.h``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

# struct luo_event: one 64-byte record per event, fields in order.
EVENT_FIELDS: Tuple[Tuple[str, str, str], ...] = (
    ("ts", "u64", "CLOCK_MONOTONIC ns (bpf_ktime_get_ns)"),
    ("tgid", "u32", ""),
    ("tid", "u32", ""),
    ("probe", "u16", "PROBE_<name>: index in tracer/probes/catalog.py PROBES"),
    ("kind", "u8", "EV_*"),
    ("flags", "u8", "EVF_*"),
    ("ret", "s32", "return value (EV_RETURN)"),
    ("ino", "u64", "file key: inode number, or the serialized-data handle when dev == SER_DEV"),
    ("dev", "u32", "file key: the superblock's dev_t (kernel encoding)"),
    ("handler", "u32", "HANDLER_*"),
    ("a0", "u64", "probe-specific, named per probe in the catalog"),
    ("a1", "u64", ""),
    ("a2", "u64", "on EV_RETURN: the call's duration in ns"),
)
_NUMPY = {"u64": "<u8", "u32": "<u4", "u16": "<u2", "u8": "u1", "s32": "<i4"}
EVENT_DTYPE = np.dtype([(name, _NUMPY[ctype]) for name, ctype, _doc in EVENT_FIELDS])
EVENT_SIZE = EVENT_DTYPE.itemsize

# Event kinds (luo_event.kind).
EV: Dict[str, int] = {"ENTRY": 0, "RETURN": 1, "INSTANT": 2}
# Event flags (luo_event.flags): which values BPF could not read (an offset unknown).
EVF: Dict[str, int] = {"KEY_UNKNOWN": 1, "A0_UNKNOWN": 2, "A1_UNKNOWN": 4}

# Per-CPU counters (map luo_counters), in index order, with what each counts.
COUNTERS: Tuple[Tuple[str, str], ...] = (
    ("lost", "lifecycle events dropped: ring buffer full"),
    ("emitted", "lifecycle events written"),
    ("sampled_out", "per-folio events skipped by --sample"),
    ("inflight_full", "calls whose entry could not be remembered (in-flight map or task storage full)"),
    ("unattributed", "per-folio KHO calls made outside any traced handler operation"),
    ("sample_tick", "per-folio calls seen by the sampler"),
    ("folio_lost", "per-folio events dropped: folio ring buffer full"),
    ("folio_emitted", "per-folio events written"),
    ("map_full", "a per-file map was full: that file's counts are incomplete"),
)
COUNTER_NAMES = tuple(name for name, _doc in COUNTERS)

# luo_event.dev / struct fkey.dev of a key that is a serialized-data handle
# (retrieve, finish: no file exists yet in the new kernel).
SER_DEV = 0xFFFFFFFF


def header() -> str:
    """The C definitions of this module, for the BPF programs (and gcc)."""
    out = ["/* Generated from tracer/kernel/abi.py: do not edit (python -m tracer.kernel.abi > bpf/abi.h). */",
           "#ifndef LUOTRACE_ABI_H", "#define LUOTRACE_ABI_H", ""]
    out += [f"#define EV_{k} {v}" for k, v in EV.items()] + [""]
    out += [f"#define EVF_{k} {v}" for k, v in EVF.items()] + [""]
    out += [f"#define CNT_{name.upper()} {i}\t/* {doc} */" for i, (name, doc) in enumerate(COUNTERS)]
    out += [f"#define NR_COUNTERS {len(COUNTERS)}", "", f"#define SER_DEV {SER_DEV:#x}", ""]
    out.append("struct luo_event {")
    for name, ctype, doc in EVENT_FIELDS:
        out.append(f"\t{ctype} {name};" + (f"\t/* {doc} */" if doc else ""))
    out += ["};", "", "#endif", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(header(), end="")
