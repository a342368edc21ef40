"""The fleet dataset's tables: one Parquet dataset per table, hive-partitioned
by the update's date and kernel, read as they are by DuckDB, Spark and Trino.

Kept here alone, like a schema file, so that writers, readers and the docs
(README "fleet") name one source.  Integers stay integers (times in ns, counts
as int64), strings are strings, labels are a map on ``updates``.  A column
added later is appended (readers union by name); a change of meaning bumps
VERSION, which every row carries in ``updates.schema``."""
from __future__ import annotations

import os
import re
from typing import Dict, Iterator, List, Tuple

import pyarrow as pa

from .catalog import PHASE_ORDER

VERSION = "luotrace.fleet/1"
# hive partition columns, outermost first: directories <table>/date=…/kernel=…/
PARTITIONS: Tuple[str, ...] = ("date", "kernel")
# a part file: part-<batch>.parquet (a hidden .part-<batch>.parquet.tmp while written)
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"

_I = pa.int64()
_S = pa.string()

# (name, type, what it holds); every row names its update, a file's row its file
_UPDATE = [("recording_id", _S, "the update (updates.recording_id)"), ("host", _S, "hostname")]
_FILE = _UPDATE + [("handler", _S, "file handler: guest_memfd, memfd, ..."), ("inode", _I, "inode number")]
COLUMNS: Dict[str, List[Tuple[str, pa.DataType, str]]] = {
    "updates": [
        ("recording_id", _S, "sha256 (32 hex) of the recording's header: the same recording exported twice is one row"),
        ("schema", _S, "this dataset's schema version"),
        ("host", _S, "hostname the recording was taken on"),
        ("boot_id", _S, "boot id of the traced kernel (null for simulated recordings)"),
        ("kernel_release", _S, "uname -r of the traced kernel, exact (the kernel partition is it made path-safe)"),
        ("luotrace_version", _S, "luotrace that recorded it"),
        ("mode", _S, "light, folio or trace"),
        ("target", _S, "what was traced: kernel, a model binary, simulate"),
        ("folio_source", _S, "where folio counts came from: array, calls"),
        ("gmem_backing", _S, "guest_memfd or standin (null where no guest_memfd was traced)"),
        ("labels", pa.map_(_S, _S), "--label KEY=VALUE pairs, e.g. labels['patch']"),
        ("started_ns", _I, "wall clock (ns since the epoch) the recording started"),
        ("duration_ns", _I, "recording length"),
        ("files", _I, "files seen"),
        ("files_error", _I, "files whose preserve or retrieve failed"),
        ("folios_preserved", _I, "folios handed to KHO"),
        ("bytes_preserved", _I, "bytes handed to KHO"),
        ("anomalies", _I, "anomalies found"),
        ("blackout_ns", _I, "longest session blackout (null when no session froze)"),
        ("events_received", _I, "events read"),
        ("events_lost", _I, "events the kernel dropped"),
        ("truncated", pa.bool_(), "the recording was cut short (its sound parts are here)"),
        ("damaged_parts", _I, "chunks whose checksum failed (skipped)"),
        ("damaged_records", _I, "event records in those chunks"),
    ],
    "files": _FILE + [
        ("dev", _I, "superblock dev"),
        ("session", _I, "session number within the update (null outside a session)"),
        ("size_bytes", _I, "file size"),
        ("result", _S, "retrieved, preserved, error, cancelled, ..."),
        ("errno", _S, "errno name of the failure (null on success)"),
        ("failed_phase", _S, "phase that failed"),
        ("folios_populated", _I, "folios in the page cache at preserve"),
        ("nr_folios", _I, "folios the serialized array holds"),
        ("folios_preserved", _I, "folios handed to KHO"),
        ("folios_unpreserved", _I, "folios unpreserved (cancel, unwind)"),
        ("folios_restored", _I, "folios restored in the new kernel"),
        ("folios_discarded", _I, "folios discarded in the new kernel"),
        ("anomalies", _I, "anomalies on this file"),
        ("blackout_ns", _I, "blackout of this file across the kexec (null when not joined)"),
    ] + [(f"{p}_ns", _I, f"total duration of the {p} phase (null if it did not run)") for p in PHASE_ORDER],
    "phases": _FILE + [
        ("phase", _S, "phase name (see `luotrace report`)"),
        ("parent", _S, "enclosing phase (null at the top)"),
        ("start_ns", _I, "start, from the recording's start"),
        ("duration_ns", _I, "duration"),
        ("errno", _S, "errno name if the call failed"),
        ("count", _I, "folios the phase handled (walk passes)"),
    ],
    "sessions": _UPDATE + [
        ("session", _I, "session number within the update"),
        ("files", _I, "files in the session"),
        ("blackout_start_ns", _I, "freeze time, from the recording's start"),
        ("blackout_ns", _I, "freeze to the kexec (or to the end)"),
        ("freeze_errno", _S, "errno name if the freeze failed"),
        ("cancelled", pa.bool_(), "the session was cancelled"),
    ],
    "anomalies": _FILE + [
        ("code", _S, "anomaly code (holes, folio_added_while_frozen, ...)"),
        ("detail", _S, "one line of evidence"),
        ("count", _I, "how many (folios, pages)"),
        ("first_index", _I, "first page index concerned"),
        ("pfn", _I, "pfn concerned"),
        ("time_ns", _I, "when, from the recording's start"),
    ],
    "folio_latency": _FILE + [
        ("log2_ns", _I, "bucket: latencies in [2^log2_ns, 2^(log2_ns+1)) ns"),
        ("count", _I, "kho_preserve_folio calls in the bucket"),
    ],
}

TABLES: Tuple[str, ...] = tuple(COLUMNS)
SCHEMAS: Dict[str, pa.Schema] = {t: pa.schema([(n, ty) for n, ty, _ in cols]) for t, cols in COLUMNS.items()}


def partition_value(s: str) -> str:
    """A value as a hive directory name every engine reads back unchanged:
    no '/', '=', '%' or spaces (those would be escaped differently)."""
    v = re.sub(r"[^A-Za-z0-9._+-]", "_", s or "")
    return v[:100] or "unknown"


def parts(root: str, table: str) -> Iterator[str]:
    """The part files of TABLE in the dataset at ROOT (never a temporary one)."""
    for d, _dirs, names in os.walk(os.path.join(root, table)):
        for n in names:
            if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX):
                yield os.path.join(d, n)
