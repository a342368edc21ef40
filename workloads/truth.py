"""What every workload driver does with its ground truth and its sizes."""
from __future__ import annotations

import json
from typing import Optional

from tracer.base import units


def write_truth(truth: dict, path: Optional[str]) -> None:
    """The driver's ground truth as JSON, to a file or stdout (tests compare luotrace with it)."""
    out = json.dumps(truth)
    if path:
        with open(path, "w") as fh:
            fh.write(out)
    else:
        print(out)


def parse_size(s: str) -> int:
    """A driver's file size: whole 4 KiB pages (ValueError says why not)."""
    return units.parse_size(s, whole_pages=True)
