"""Recordings into the fleet dataset (tracer/fleet/schema.py): the tables of
each recording's report, appended as Parquet parts that DuckDB, Spark and
Trino read in place.

Crash-consistent and safe to run again.  The dataset is what its manifest
(``_luotrace/manifest.json``) names; a batch of recordings becomes part of it
by one rename of a new manifest, so a kill at any instant leaves the whole
batch or none of it.  Before a batch writes anything it lists the files it
will create or drop in an intent file; the next export removes the files an
intent lists and the manifest does not name (a killed export's parts and
temporary files), and never any other file.  A recording is keyed by a hash
of its header: the same recording again adds nothing, a larger copy of it
(one that was still being written when first exported) replaces its rows.
One bad recording costs only itself: a value that fits no column refuses
that recording with one line.  One export at a time per dataset (a lock
file; the workers that read recordings in parallel die with the export)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import signal
import stat
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracer.fleet import schema as fs
from tracer.kernel import host
from tracer.recording import format as rec
from tracer.base.errors import LuotraceError, corrupt_content
from tracer.analysis.replay import report_of

LOCK = "lock"
BATCH = 2000  # recordings per part: parts stay few and large, memory stays bounded
INT64 = (-(1 << 63), (1 << 63) - 1)

Rows = Dict[str, List[dict]]
Part = Tuple[str, str]


def recording_id(header: dict) -> str:
    """The same recording, wherever it was copied, has the same id."""
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:32]


def _partition(header: dict) -> Part:
    ck = header.get("clock") or {}
    real = ck.get("base_realtime_ns")
    date = ""
    if isinstance(real, int) and 0 <= real < 253402300800 * 10 ** 9:  # before the year 10000
        date = time.strftime("%Y-%m-%d", time.gmtime(real / 1e9))
    return fs.partition_value(date or str(header.get("started") or "")[:10]), \
        fs.partition_value(str(header.get("kernel") or ""))


def _ns(x) -> Optional[int]:
    return None if x is None else int(x)


class Refused(ValueError):
    """A value of a recording that fits no column of the dataset."""


def _text(s: str) -> str:
    """A string Parquet can hold (UTF-8): a lone surrogate becomes its escape."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _fit(table: str, row: dict) -> dict:
    """ROW with every value in its column's type, or Refused naming the one
    that cannot be (a u64 above int64, a non-number where a count goes)."""
    out: dict = {}
    for f in fs.SCHEMAS[table]:
        v = row.get(f.name)
        if v is None:
            out[f.name] = None
        elif pa.types.is_integer(f.type):
            if isinstance(v, bool) or not isinstance(v, int) or not INT64[0] <= v <= INT64[1]:
                raise Refused(f"{table}.{f.name} = {str(v)[:40]} does not fit a signed 64-bit integer")
            out[f.name] = v
        elif pa.types.is_boolean(f.type):
            out[f.name] = bool(v)
        elif pa.types.is_map(f.type):
            out[f.name] = [(_text(str(k)), _text(str(x))) for k, x in v]
        else:
            out[f.name] = _text(str(v))
    return out


def rows_of(path: str) -> Tuple[Optional[Part], Rows, List[str]]:
    """One recording's rows, by table; its partition; warnings.  A recording
    that cannot be read, or holds a value no column takes, gives no rows and
    one warning."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            return None, {}, [f"{path}: skipped: {kind}"]
        r = rec.read(path)
        with corrupt_content():
            part, rows, warnings = _rows(path, r, st.st_size)
        return part, {t: [_fit(t, x) for x in rs] for t, rs in rows.items()}, warnings
    except LuotraceError as e:
        return None, {}, [f"{path}: skipped: {e}"]
    except OSError as e:
        return None, {}, [f"{path}: skipped: {e.strerror or e}"]
    except Refused as e:
        return None, {}, [f"{path}: skipped: {e}"]


def _rows(path: str, r: rec.Recording, size: int) -> Tuple[Part, Rows, List[str]]:
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
        "recording_id": rid, "recording_bytes": size, "schema": fs.VERSION, "host": host,
        "boot_id": (h.get("clock") or {}).get("boot_id"),
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
    already: int = 0  # recordings the dataset already held (or held a larger copy of)
    replaced: int = 0  # recordings whose rows a larger copy replaced
    skipped: int = 0  # recordings that could not be read
    rows: Dict[str, int] = field(default_factory=lambda: {t: 0 for t in fs.TABLES})
    parts: int = 0  # Parquet files written
    removed_orphans: int = 0  # files of an export cut short, removed
    warnings: List[str] = field(default_factory=list)


def _tmp(path: str) -> str:
    d, n = os.path.split(path)
    return os.path.join(d, f".{n}.tmp")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj) -> None:
    """PATH replaced whole by one rename: a reader sees the old or the new."""
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync_path(os.path.dirname(path))


def _recover(root: str, manifest: Dict[str, List[str]]) -> int:
    """Remove what exports cut short left: every file an intent lists that
    the manifest does not name (and its temporary), then the intent."""
    meta = os.path.join(root, fs.META)
    named = {p for ps in manifest.values() for p in ps}
    n = 0
    for name in sorted(os.listdir(meta)):
        path = os.path.join(meta, name)
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(path)  # a manifest or intent never renamed into place
            continue
        if not (name.startswith("intent-") and name.endswith(".json")):
            continue
        try:
            with open(path) as f:
                listed = [str(p) for p in json.load(f)]
        except (OSError, ValueError):
            listed = []
        for rel in listed:
            if rel in named or os.path.isabs(rel) or ".." in rel.split("/"):
                continue
            for p in (os.path.join(root, rel), _tmp(os.path.join(root, rel))):
                try:
                    os.unlink(p)
                    n += 1
                except FileNotFoundError:
                    pass
        os.unlink(path)
    return n


def known_ids(root: str) -> Dict[str, int]:
    """Recording ids the dataset holds, with the size of the copy it holds
    (two columns are read)."""
    ids: Dict[str, int] = {}
    for p in fs.parts(root, "updates"):
        t = pq.read_table(p, columns=["recording_id", "recording_bytes"])
        ids.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
    return ids


def _part_dir(table: str, part: Part) -> str:
    return "/".join([table] + [f"{k}={v}" for k, v in zip(fs.PARTITIONS, part)])


def _write_part(root: str, rel: str, table: pa.Table) -> None:
    final = os.path.join(root, rel)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = _tmp(final)
    pq.write_table(table, tmp, compression="zstd")
    _fsync_path(tmp)
    os.rename(tmp, final)


# recordings waiting to be written, at most one copy of each (the largest seen):
# id -> partition, rows, whether it replaces a committed copy
Batch = Dict[str, Tuple[Part, Rows, bool]]


def _commit(root: str, manifest: Dict[str, List[str]], batch: Batch, res: ExportResult) -> None:
    """The batch's parts written, then the manifest naming them: the commit.
    A committed copy that a larger one replaces goes by rewriting the parts
    that hold its rows in the same commit."""
    if not batch:
        return
    name = uuid.uuid4().hex[:16]
    pending: Dict[Tuple[str, Part], List[dict]] = {}
    for part, rows, _r in batch.values():
        for t, rs in rows.items():
            if rs:
                pending.setdefault((t, part), []).extend(rs)
    writes: List[Tuple[str, pa.Table]] = [
        (f"{_part_dir(t, part)}/{fs.PART_PREFIX}{name}{fs.PART_SUFFIX}", pa.Table.from_pylist(rs, schema=fs.SCHEMAS[t]))
        for (t, part), rs in sorted(pending.items())]
    drops: List[str] = []
    replaced = {rid for rid, (_p, _r, again) in batch.items() if again}
    if replaced:
        dirs = {_part_dir(t, p) + "/" for t in fs.TABLES for p, _r, again in batch.values() if again}
        gone = pa.array(sorted(replaced), type=pa.string())
        for t in fs.TABLES:
            for rel in manifest[t]:
                if not any(rel.startswith(d) for d in dirs):
                    continue
                old = pq.read_table(os.path.join(root, rel))
                keep = old.filter(pc.invert(pc.is_in(old.column("recording_id"), value_set=gone)))
                if keep.num_rows == old.num_rows:
                    continue
                drops.append(rel)
                if keep.num_rows:
                    writes.append((f"{os.path.dirname(rel)}/{fs.PART_PREFIX}{name}-{len(drops)}{fs.PART_SUFFIX}", keep))
    intent = os.path.join(root, fs.META, f"intent-{name}.json")
    _write_json(intent, [rel for rel, _t in writes] + drops)
    for rel, table in writes:
        _write_part(root, rel, table)
        res.parts += 1
    new = {t: [p for p in manifest[t] if p not in drops] for t in fs.TABLES}
    for rel, _t in writes:
        new[rel.split("/", 1)[0]].append(rel)
    _write_json(fs.manifest_path(root), {"schema": fs.VERSION, "parts": new})  # the commit
    manifest.clear()
    manifest.update(new)
    for rel in drops:
        os.unlink(os.path.join(root, rel))
    os.unlink(intent)
    for _p, rows, again in batch.values():
        for t, rs in rows.items():
            res.rows[t] += len(rs)
        res.replaced += again
        res.added += not again
    batch.clear()


class _Lock:
    def __init__(self, root: str):
        self.fd = os.open(os.path.join(root, fs.META, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __enter__(self) -> "_Lock":
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LuotraceError("another export is writing this dataset", "wait for it to finish") from None
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _open_root(root: str) -> None:
    if os.path.exists(root) and not os.path.isdir(root):
        raise LuotraceError(f"{root} is not a directory", "give a directory for the dataset (created if missing)")
    try:
        os.makedirs(os.path.join(root, fs.META), exist_ok=True)
    except OSError as e:
        raise LuotraceError(f"cannot create {root}: {e.strerror}", "choose a writable directory") from None


def export(root: str, paths: Sequence[str], jobs: int = 1, batch: int = BATCH,
           progress: Optional[Callable[[int, int], None]] = None) -> ExportResult:
    """Append PATHS to the dataset at ROOT; see the module docstring."""
    _open_root(root)
    res = ExportResult()
    with _Lock(root):
        manifest = fs.read_manifest(root)
        res.removed_orphans = _recover(root, manifest)
        if res.removed_orphans:
            res.warnings.append(f"{root}: removed {res.removed_orphans} file(s) of an export that was cut short")
        seen = known_ids(root)
        pending: Batch = {}
        for i, (path, (part, rows, warns)) in enumerate(_each(paths, jobs, res.warnings)):
            res.warnings.extend(warns)
            if progress:
                progress(i + 1, len(paths))
            if part is None:
                res.skipped += 1
                continue
            rid = rows["updates"][0]["recording_id"]
            size = rows["updates"][0]["recording_bytes"]
            held = seen.get(rid)
            if held is not None and size <= held:
                res.already += 1
                if size < held:
                    res.warnings.append(f"{path}: a larger copy of this recording is already in the dataset; "
                                        "this one is not added")
                continue
            if held is not None:
                res.warnings.append(f"{path}: larger than the copy of this recording in the dataset "
                                    f"({size} > {held} bytes): its rows replace that copy's")
            again = pending[rid][2] if rid in pending else held is not None  # a committed copy goes
            seen[rid] = size
            pending[rid] = (part, rows, again)
            if len(pending) >= batch:
                _commit(root, manifest, pending, res)
        _commit(root, manifest, pending, res)
    return res


def _die_with_parent(parent: int) -> None:
    """A worker ends when the export does, whatever ends it (SIGKILL too):
    none is left reading recordings for a parent that is gone."""
    try:
        host.libc().prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _each(paths: Sequence[str], jobs: int, warnings: List[str]) -> Iterator[Tuple[str, tuple]]:
    """Each path with what rows_of gives, in order.  Workers are spawned (not
    forked: a fork would hold the dataset's lock as long as it lived); a
    worker that dies (the OOM killer) costs one line, and what it had not
    given back is read here."""
    if jobs <= 1 or len(paths) < 64:
        for p in paths:
            yield p, rows_of(p)
        return
    done = 0
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        for out in pool.map(rows_of, paths, chunksize=32):
            yield paths[done], out
            done += 1
    except BrokenProcessPool:
        warnings.append(f"a worker reading recordings died (killed?); the {len(paths) - done} not yet read "
                        "are read by the export itself")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for p in paths[done:]:
        yield p, rows_of(p)
