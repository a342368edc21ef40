"""What every workload driver does with its ground truth and its sizes."""
from __future__ import annotations

import json
from typing import Optional

from tracer.base.units import UNITS, size_bytes

PAGE_SIZE = 4096


def write_truth(truth: dict, path: Optional[str]) -> None:
    """The driver's ground truth as JSON, to a file or stdout (tests compare luotrace with it)."""
    out = json.dumps(truth)
    if path:
        with open(path, "w") as fh:
            fh.write(out)
    else:
        print(out)


def parse_size(s: str) -> int:
    """'64M', '1G', '4096' -> bytes; a positive multiple of 4 KiB."""
    try:
        n = size_bytes(s, {k: UNITS[k] for k in "KMG"})
    except ValueError:
        raise ValueError(f"bad size '{s}' (want e.g. 64M, 1G)") from None
    if n <= 0 or n % PAGE_SIZE:
        raise ValueError(f"size {s} is not a positive multiple of 4 KiB")
    return n
