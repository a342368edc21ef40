"""What every workload driver does with its ground truth and its sizes."""
from __future__ import annotations

import json
from typing import Dict, Optional

PAGE_SIZE = 4096


def write_truth(truth: dict, path: Optional[str]) -> None:
    """The driver's ground truth as JSON, to a file or stdout (tests compare luotrace with it)."""
    out = json.dumps(truth)
    if path:
        with open(path, "w") as fh:
            fh.write(out)
    else:
        print(out)


UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_bytes(s: str, units: Dict[str, int] = UNITS) -> int:
    """'64M', '1GiB', '4096' -> bytes; ValueError when it is not a size."""
    t = s.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise ValueError(f"bad size '{s}'") from None


def parse_size(s: str) -> int:
    """'64M', '1G', '4096' -> bytes; a positive multiple of 4 KiB."""
    try:
        n = size_bytes(s, {k: UNITS[k] for k in "KMG"})
    except ValueError:
        raise ValueError(f"bad size '{s}' (want e.g. 64M, 1G)") from None
    if n <= 0 or n % PAGE_SIZE:
        raise ValueError(f"size {s} is not a positive multiple of 4 KiB")
    return n
