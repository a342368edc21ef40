"""The fleet dataset's tables: one Parquet dataset per table, hive-partitioned
by the update's date and kernel, read as they are by DuckDB, Spark and Trino.

Kept here alone, like a schema file, so that writers, readers and the docs
(docs/fleet.md) name one source.  Integers stay integers (times in ns, counts
as int64), strings are strings, labels are a map on ``updates``.  A column
added later is appended (readers union by name); a change of meaning bumps
VERSION, which every row carries in ``updates.schema``."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterator, List, Tuple

import pyarrow as pa

from tracer.probes.catalog import PHASE_ORDER
from tracer.base.errors import LuotraceError

VERSION = "luotrace.fleet/2"
# hive partition columns, outermost first: directories <table>/date=…/kernel=…/
PARTITIONS: Tuple[str, ...] = ("date", "kernel")
# a part file: lt-<batch>.parquet (a hidden .lt-<batch>.parquet.tmp while written);
# only the parts the manifest names are the dataset
PART_PREFIX, PART_SUFFIX = "lt-", ".parquet"
META = "_luotrace"  # the manifest, the lock and the intents of exports under way
MANIFEST = "manifest.json"

_I = pa.int64()
_S = pa.string()

# (name, type, what it holds); every row names its update, a file's row its file
_UPDATE = [("recording_id", _S, "the update (updates.recording_id)"), ("host", _S, "hostname")]
_FILE = _UPDATE + [("handler", _S, "file handler: guest_memfd, memfd, ..."), ("inode", _I, "inode number")]
COLUMNS: Dict[str, List[Tuple[str, pa.DataType, str]]] = {
    "updates": [
        ("recording_id", _S, "sha256 (32 hex) of the recording's header: the same recording exported twice is one row"),
        ("recording_bytes", _I, "size of the copy exported: a larger copy of the same recording (one still being "
                                "written when first exported) replaces it"),
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
    no '/', '=', '%' or spaces (those would be escaped differently), and
    never the name engines read as NULL.  Lossy: distinct values may share a
    directory; the exact value is a column (kernel_release)."""
    v = re.sub(r"[^A-Za-z0-9._+-]", "_", s or "")[:100] or "unknown"
    return "_" + v if v == "__HIVE_DEFAULT_PARTITION__" else v


def manifest_path(root: str) -> str:
    return os.path.join(root, META, MANIFEST)


def read_manifest(root: str) -> Dict[str, List[str]]:
    """Each table's committed parts, as paths relative to ROOT.  A directory
    with parts but no manifest was written by luotrace before fleet/2, whose
    exports could be cut short into rows counted twice: it is refused."""
    try:
        with open(manifest_path(root)) as f:
            m = json.load(f)
    except FileNotFoundError:
        if os.path.isdir(os.path.join(root, "updates")):
            raise LuotraceError(f"{root} was written by an older luotrace (no {META}/{MANIFEST})",
                                "export its recordings again into a new directory") from None
        return {t: [] for t in TABLES}
    except (OSError, ValueError) as e:
        raise LuotraceError(f"{manifest_path(root)}: unreadable ({e})",
                            "restore it from a backup, or export the recordings again into a new directory") from None
    if not isinstance(m, dict) or m.get("schema") != VERSION or not isinstance(m.get("parts"), dict):
        raise LuotraceError(f"{manifest_path(root)}: not a {VERSION} manifest",
                            "export the recordings again into a new directory")
    return {t: [str(p) for p in m["parts"].get(t, [])] for t in TABLES}


def parts(root: str, table: str) -> Iterator[str]:
    """The committed part files of TABLE in the dataset at ROOT: what every
    reader reads, never a part of an export under way or cut short."""
    for rel in read_manifest(root)[table]:
        yield os.path.join(root, rel)
