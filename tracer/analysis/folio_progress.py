"""Per-file progress of the folios handed to KHO (trace mode's streamed
kho_preserve_folio records), binned for a timeline's counter track.

Two passes over the records, a batch at a time, so memory does not grow with
the recording: the first finds each file's first and last record and count,
the second counts records into at most MAX_POINTS equal time steps per file.
The result equals binning each file's sorted timestamps at once.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import numpy as np

from tracer.probes import catalog

MAX_POINTS = 500  # counter samples per file
_PRESERVE_FOLIO = catalog.PROBE_IDS["kho_preserve_folio"]


def _by_inode(batch: np.ndarray):
    """(inode, timestamps) of BATCH's preserved-folio records, per inode."""
    sel = batch[batch["probe"] == _PRESERVE_FOLIO]
    if not len(sel):
        return
    ino = sel["ino"]
    if (ino == ino[0]).all():  # the usual batch: one file's folios
        yield int(ino[0]), sel["ts"]
        return
    order = np.argsort(ino, kind="stable")
    inos, starts = np.unique(ino[order], return_index=True)
    ts = sel["ts"][order]
    for i, s, e in zip(inos.tolist(), starts.tolist(), list(starts[1:]) + [len(order)]):
        yield int(i), ts[s:e]


class FolioProgress:
    """Feed every batch to ``scan``, then every batch again to ``count``;
    ``series(ino)`` gives the bin ends and the cumulative count at each."""

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self.max_points = max_points
        self._span: Dict[int, Tuple[int, int, int]] = {}  # ino -> (first ts, last ts, records)
        self._edges: Dict[int, np.ndarray] = {}
        self._bins: Dict[int, np.ndarray] = {}

    def scan(self, batch: np.ndarray) -> None:
        for ino, ts in _by_inode(batch):
            lo, hi, n = int(ts.min()), int(ts.max()), len(ts)
            if ino in self._span:
                a, b, m = self._span[ino]
                lo, hi, n = min(a, lo), max(b, hi), m + n
            self._span[ino] = (lo, hi, n)

    def count(self, batch: np.ndarray) -> None:
        for ino, ts in _by_inode(batch):
            edges = self._edges.get(ino)
            if edges is None:
                lo, hi, n = self._span[ino]
                edges = self._edges[ino] = np.linspace(float(lo), float(hi) + 1, min(self.max_points, n) + 1)
                self._bins[ino] = np.zeros(len(edges) + 1, dtype=np.int64)
            # a record at t is counted at every bin end above t
            self._bins[ino] += np.bincount(np.searchsorted(edges, ts.astype(np.float64), side="right"),
                                           minlength=len(edges) + 1)

    def series(self, ino: int) -> Tuple[np.ndarray, np.ndarray]:
        """Bin ends (ns, on the records' clock) and how many folios were preserved before each."""
        edges = self._edges.get(ino)
        if edges is None:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        return edges[1:], np.cumsum(self._bins[ino])[1:len(edges)]


def of_batches(batches: Callable[[], Iterable[np.ndarray]]) -> FolioProgress:
    """The progress of one recording's records (BATCHES() is walked twice)."""
    fp = FolioProgress()
    for b in batches():
        fp.scan(b)
    for b in batches():
        fp.count(b)
    return fp
