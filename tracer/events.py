"""The raw event record and its vectorised decoding.

``EVENT_DTYPE`` mirrors ``struct luo_event`` in bpf/luotrace.h byte for byte;
decoding a block of records is one ``np.frombuffer``, never a Python call per
record.
"""
from __future__ import annotations

import errno as _errno
from typing import Dict, Optional

import numpy as np

from . import catalog

EVENT_DTYPE = np.dtype([
    ("ts", "<u8"), ("tgid", "<u4"), ("tid", "<u4"),
    ("probe", "<u2"), ("kind", "u1"), ("flags", "u1"), ("ret", "<i4"),
    ("ino", "<u8"), ("dev", "<u4"), ("handler", "<u4"),
    ("a0", "<u8"), ("a1", "<u8"), ("a2", "<u8"),
])
EVENT_SIZE = EVENT_DTYPE.itemsize
assert EVENT_SIZE == 64

EV_ENTRY, EV_RETURN, EV_INSTANT = 0, 1, 2
EVF_KEY_UNKNOWN, EVF_A0_UNKNOWN, EVF_A1_UNKNOWN = 1, 2, 4



def decode(buf: bytes) -> np.ndarray:
    """Whole records in ``buf`` as a structured array (a trailing partial record is ignored)."""
    n = len(buf) // EVENT_SIZE
    return np.frombuffer(buf, dtype=EVENT_DTYPE, count=n)


# Linux errnos Python's errno module does not name
# (include/uapi/asm-generic/errno.h, Linux 6.18).
_LINUX_ERRNO = {133: "EHWPOISON", 132: "ERFKILL", 512: "ERESTARTSYS", 524: "ENOTSUPP"}


def errno_name(ret: int) -> Optional[str]:
    """-12 -> 'ENOMEM'; None for success; 'E<n>' for numbers nobody names."""
    if ret >= 0:
        return None
    return _errno.errorcode.get(-ret) or _LINUX_ERRNO.get(-ret, f"E{-ret}")


def to_dict(ev, base_ns: int = 0) -> dict:
    """One event as JSON: probe, kind, time, file key and its catalog-named fields."""
    p = catalog.PROBES[int(ev["probe"])] if int(ev["probe"]) < len(catalog.PROBES) else None
    kind = {EV_ENTRY: "entry", EV_RETURN: "return", EV_INSTANT: "instant"}.get(int(ev["kind"]), "?")
    return {"ts_ns": int(ev["ts"]) - base_ns, "probe": p.name if p else int(ev["probe"]),
            "symbol": p.symbol if p else None, "kind": kind, "tid": int(ev["tid"]),
            "handler": catalog.HANDLER_NAMES.get(int(ev["handler"]), "unknown"), "inode": int(ev["ino"]),
            "dev": int(ev["dev"]), **(fields(ev) if p else {})}


_UNKNOWN_FLAG = {"a0": EVF_A0_UNKNOWN, "a1": EVF_A1_UNKNOWN}


def fields(ev) -> Dict[str, object]:
    """Named fields of one event, from the catalog, decoded by type: a field
    BPF could not read is null, a bool return is a bool (a C bool leaves the
    upper bytes of the register undefined), a negative return is named."""
    p = catalog.PROBES[int(ev["probe"])]
    names = p.ret if int(ev["kind"]) == EV_RETURN else p.entry
    flags = int(ev["flags"])
    out: Dict[str, object] = {name: None if flags & _UNKNOWN_FLAG.get(slot, 0) else int(ev[slot])
                              for slot, name in names.items()}
    if int(ev["kind"]) == EV_RETURN:
        out["duration_ns"] = int(ev["a2"])
        ret = int(ev["ret"])
        if p.returns == "bool":
            out["ret"] = bool(ret & 0xFF)
        else:
            out["ret"] = ret
            if ret < 0:
                out["errno"] = errno_name(ret)
    return out
