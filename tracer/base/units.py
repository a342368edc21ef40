"""Sizes as people write them ('64M', '1GiB', '4096'): the one parser for
every option and workload argument that takes a size."""
from __future__ import annotations

from typing import Dict

UNITS: Dict[str, int] = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_bytes(s: str, units: Dict[str, int] = UNITS) -> int:
    """'64M', '1GiB', '4096' -> bytes; ValueError when it is not a size."""
    t = s.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise ValueError(f"bad size '{s}'") from None
