"""Recordings into the fleet dataset (tracer/fleet_schema.py): the tables of
each recording's report, appended as Parquet parts that DuckDB, Spark and
Trino read in place.

Safe to run again and to interrupt: a recording already in the dataset adds
nothing (keyed by a hash of its header), every part is written to a hidden
temporary file and renamed whole, and ``updates`` is renamed last, so an
export cut short leaves parts no update names; the next export removes
them.  One export at a time per dataset (a lock file)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from . import fleet_schema as fs
from . import recording as rec
from .errors import LuotraceError, corrupt_content
from .replay import report_of

LOCK = ".luotrace-fleet.lock"
BATCH = 2000  # recordings per part: parts stay few and large, memory stays bounded

Rows = Dict[str, List[dict]]


def recording_id(header: dict) -> str:
    """The same recording, wherever it was copied, has the same id."""
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:32]


def _partition(header: dict) -> Tuple[str, str]:
    ck = header.get("clock") or {}
    real = ck.get("base_realtime_ns")
    date = time.strftime("%Y-%m-%d", time.gmtime(real / 1e9)) if isinstance(real, int) else \
        str(header.get("started") or "")[:10]
    return fs.partition_value(date), fs.partition_value(str(header.get("kernel") or ""))


def _ns(x) -> Optional[int]:
    return None if x is None else int(x)


def rows_of(path: str) -> Tuple[Optional[Tuple[str, str]], Rows, List[str]]:
    """One recording's rows, by table; its partition; warnings.  A recording
    that cannot be read gives no rows and one warning."""
    try:
        r = rec.read(path)
        with corrupt_content():
            return _rows(path, r)
    except LuotraceError as e:
        return None, {}, [f"{path}: skipped: {e}"]


def _rows(path: str, r: rec.Recording) -> Tuple[Tuple[str, str], Rows, List[str]]:
    warnings = []
    if r.truncated:
        warnings.append(f"{path}: {r.truncated_reason}; its sound parts are exported")
    if r.damaged:
        warnings.append(f"{path}: {len(r.damaged)} damaged part(s) skipped ({r.damaged_records} event records)")
    rep = report_of(r)
    h = r.header
    rid = recording_id(h)
    host = str(h.get("hostname") or "")
    tot = rep["totals"]
    files_error = sum(1 for f in rep["files"] if f.get("errno"))
    blackouts = [s["blackout_ns"] for s in rep["sessions"] if s.get("blackout_ns") is not None]
    ev = rep["events"]
    out: Rows = {t: [] for t in fs.TABLES}
    out["updates"].append({
        "recording_id": rid, "schema": fs.VERSION, "host": host, "boot_id": (h.get("clock") or {}).get("boot_id"),
        "kernel_release": h.get("kernel"), "luotrace_version": h.get("luotrace_version"), "mode": h.get("mode"),
        "target": h.get("target"), "folio_source": rep.get("folio_source"),
        "gmem_backing": (rep.get("gmem") or {}).get("backing"),
        "labels": sorted((str(k), str(v)) for k, v in (h.get("labels") or {}).items()),
        "started_ns": _ns((h.get("clock") or {}).get("base_realtime_ns")), "duration_ns": _ns(rep.get("duration_ns")),
        "files": tot["files"], "files_error": files_error, "folios_preserved": tot["folios_preserved"],
        "bytes_preserved": tot["bytes_preserved"], "anomalies": len(rep["anomalies"]),
        "blackout_ns": max(blackouts) if blackouts else None,
        "events_received": ev["received"], "events_lost": ev["lost"], "truncated": bool(r.truncated),
        "damaged_parts": len(r.damaged), "damaged_records": r.damaged_records})
    for f in rep["files"]:
        key = {"recording_id": rid, "host": host, "handler": f["handler"], "inode": f["inode"]}
        totals: Dict[str, int] = {}
        for p in f["phases"]:
            totals[p["name"]] = totals.get(p["name"], 0) + p["duration_ns"]
            out["phases"].append(dict(key, phase=p["name"], parent=p.get("parent"), start_ns=p["start_ns"],
                                      duration_ns=p["duration_ns"], errno=p.get("errno"), count=p.get("count")))
        row = dict(key, dev=f["dev"], session=f.get("session"), size_bytes=f.get("size_bytes"), result=f["result"],
                   errno=f.get("errno"), failed_phase=f.get("failed_phase"),
                   anomalies=len(f.get("anomalies") or []), blackout_ns=f.get("blackout_ns"))
        for k in ("folios_populated", "nr_folios", "folios_preserved", "folios_unpreserved", "folios_restored",
                  "folios_discarded"):
            row[k] = f.get(k)
        for ph, ns in totals.items():
            row[f"{ph}_ns"] = ns
        out["files"].append(row)
        for slot, n in sorted((f.get("folio_latency_log2_ns") or {}).items(), key=lambda kv: int(kv[0])):
            out["folio_latency"].append(dict(key, log2_ns=int(slot), count=n))
    for a in rep["anomalies"]:
        out["anomalies"].append({"recording_id": rid, "host": host, "handler": a["handler"], "inode": a.get("inode"),
                                 "code": a["code"], "detail": a.get("detail"), "count": a.get("count"),
                                 "first_index": a.get("first_index"), "pfn": a.get("pfn"), "time_ns": a.get("time_ns")})
    for s in rep["sessions"]:
        out["sessions"].append({"recording_id": rid, "host": host, "session": s["id"], "files": len(s.get("files") or []),
                                "blackout_start_ns": s.get("blackout_start_ns"), "blackout_ns": s.get("blackout_ns"),
                                "freeze_errno": s.get("freeze_errno"), "cancelled": bool(s.get("cancelled"))})
    return _partition(h), out, warnings


@dataclass
class ExportResult:
    added: int = 0  # recordings added
    already: int = 0  # recordings the dataset already held
    skipped: int = 0  # recordings that could not be read
    rows: Dict[str, int] = field(default_factory=lambda: {t: 0 for t in fs.TABLES})
    parts: int = 0  # Parquet files written
    removed_orphans: int = 0  # parts of an export cut short, removed
    warnings: List[str] = field(default_factory=list)


def _batch_of(path: str) -> str:
    return os.path.basename(path)[len(fs.PART_PREFIX):-len(fs.PART_SUFFIX)]


def _remove_orphans(root: str) -> int:
    """Parts of an export that never wrote its ``updates`` part."""
    done = {_batch_of(p) for p in fs.parts(root, "updates")}
    n = 0
    for t in fs.TABLES:
        for p in list(fs.parts(root, t)):
            if _batch_of(p) not in done:
                os.unlink(p)
                n += 1
    return n


def known_ids(root: str) -> Set[str]:
    """Recording ids already in the dataset (only one column is read)."""
    ids: Set[str] = set()
    for p in fs.parts(root, "updates"):
        ids.update(pq.read_table(p, columns=["recording_id"]).column(0).to_pylist())
    return ids


def _write_part(root: str, table: str, part: Tuple[str, str], batch: str, rows: List[dict]) -> str:
    d = os.path.join(root, table, *(f"{k}={v}" for k, v in zip(fs.PARTITIONS, part)))
    os.makedirs(d, exist_ok=True)
    final = os.path.join(d, f"{fs.PART_PREFIX}{batch}{fs.PART_SUFFIX}")
    tmp = os.path.join(d, f".{fs.PART_PREFIX}{batch}{fs.PART_SUFFIX}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=fs.SCHEMAS[table]), tmp, compression="zstd")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    return final


def _flush(root: str, pending: Dict[Tuple[str, str], Rows], res: ExportResult) -> None:
    """One part per table and partition; ``updates`` last: its part is what
    makes the others count."""
    if not pending:
        return
    batch = uuid.uuid4().hex[:16]
    for table in [t for t in fs.TABLES if t != "updates"] + ["updates"]:
        for part, rows in sorted(pending.items()):
            if rows[table]:
                _write_part(root, table, part, batch, rows[table])
                res.parts += 1
    pending.clear()


class _Lock:
    def __init__(self, root: str):
        self.fd = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self) -> "_Lock":
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LuotraceError("another export is writing this dataset", "wait for it to finish") from None
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def export(root: str, paths: Sequence[str], jobs: int = 1, batch: int = BATCH,
           progress: Optional[Callable[[int, int], None]] = None) -> ExportResult:
    """Append PATHS to the dataset at ROOT; see the module docstring."""
    for p in paths:
        if not os.path.isfile(p):
            raise LuotraceError(f"{p}: no such recording", "give files written by `luotrace record`")
    if os.path.exists(root) and not os.path.isdir(root):
        raise LuotraceError(f"{root} is not a directory", "give a directory for the dataset (created if missing)")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise LuotraceError(f"cannot create {root}: {e.strerror}", "choose a writable directory") from None
    res = ExportResult()
    with _Lock(root):
        res.removed_orphans = _remove_orphans(root)
        if res.removed_orphans:
            res.warnings.append(f"{root}: removed {res.removed_orphans} part(s) of an export that was cut short")
        seen = known_ids(root)
        pending: Dict[Tuple[str, str], Rows] = {}
        in_batch = 0
        for i, (part, rows, warns) in enumerate(_each(paths, jobs)):
            res.warnings.extend(warns)
            if progress:
                progress(i + 1, len(paths))
            if part is None:
                res.skipped += 1
                continue
            rid = rows["updates"][0]["recording_id"]
            if rid in seen:
                res.already += 1
                continue
            seen.add(rid)
            into = pending.setdefault(part, {t: [] for t in fs.TABLES})
            for t, rs in rows.items():
                into[t].extend(rs)
                res.rows[t] += len(rs)
            res.added += 1
            in_batch += 1
            if in_batch >= batch:
                _flush(root, pending, res)
                in_batch = 0
        _flush(root, pending, res)
    return res


def _each(paths: Sequence[str], jobs: int) -> Iterable[Tuple[Optional[Tuple[str, str]], Rows, List[str]]]:
    if jobs <= 1 or len(paths) < 64:
        return map(rows_of, paths)
    pool = ProcessPoolExecutor(jobs)
    return _closing(pool, pool.map(rows_of, paths, chunksize=32))


def _closing(pool: ProcessPoolExecutor, it: Iterator) -> Iterator:
    try:
        yield from it
    finally:
        pool.shutdown(cancel_futures=True)
