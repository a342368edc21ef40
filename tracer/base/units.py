"""Sizes as people write them ('64M', '1GiB', '4096'), and the page they
come in: the one parser for every option and workload argument that takes a
size, and the one page size."""
from __future__ import annotations

from typing import Dict

PAGE_SIZE = 4096  # x86-64's base page: a guest_memfd or memfd folio is a multiple of it

UNITS: Dict[str, int] = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_bytes(s: str, units: Dict[str, int] = UNITS) -> int:
    """'64M', '1GiB', '4096' -> bytes; ValueError when it is not a size."""
    t = s.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise ValueError(f"bad size '{s}'") from None


def parse_size(s: str, whole_pages: bool = False) -> int:
    """A size of memory: at least a page; with WHOLE_PAGES a positive
    multiple of it (what a guest_memfd or memfd is made of).  ValueError
    says what is wrong with S."""
    n = size_bytes(s)
    if whole_pages and (n <= 0 or n % PAGE_SIZE):
        raise ValueError(f"size {s} is not a positive multiple of 4 KiB")
    if n < PAGE_SIZE:
        raise ValueError(f"size '{s}' is smaller than one 4 KiB page")
    return n
