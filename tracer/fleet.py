"""Questions across many hosts' updates, answered by an engine reading the
fleet dataset (tracer/dataset.py writes it, tracer/fleet_schema.py names its
columns): DuckDB embedded here; the same SQL text runs on Spark (see
``summary_sql``), so a cluster gives the numbers a laptop gives.

Memory stays bounded whatever the dataset's size: DuckDB streams the Parquet
parts under a memory limit (spilling to a temporary directory), and compare
draws a bounded, deterministic sample per phase."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import fleet_schema as fs
from .catalog import LEAF_PHASES, PHASE_ORDER
from .compare import Side
from .errors import LuotraceError

MEMORY_LIMIT = "512MB"
# calls per side and phase that compare uses: its bootstrap holds 2,000 x n
# indices, so n is what bounds its memory (at 4,000: 64 MB per side)
SAMPLE_CAP = 4000
# columns of updates a summary can group by; any other name is a label
COLUMNS_BY = ("host", "kernel", "date", "kernel_release", "mode", "target", "folio_source", "gmem_backing")
_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def group_expr(by: str) -> str:
    """SQL for the grouping value of update row ``u``: a column, or a label."""
    if by in COLUMNS_BY:
        return f"u.{by}"
    if not _LABEL.match(by):
        raise LuotraceError(f"bad --by '{by}'",
                            f"use a column ({', '.join(COLUMNS_BY)}) or a label name such as patch")
    return f"u.labels['{by}']"


def _quantile(dialect: str) -> str:
    # both interpolate linearly between the two nearest values (numpy's default)
    return {"duckdb": "quantile_cont", "spark": "percentile"}[dialect]


def _where(where: Optional[str]) -> str:
    """A user's filter on the updates (alias ``u``), as a SQL condition."""
    return f"({where})" if where else "TRUE"


def summary_sql(by: str, dialect: str = "duckdb", where: Optional[str] = None) -> Dict[str, str]:
    """The summary's queries, in SQL both DuckDB and Spark run as written
    (only the exact-percentile function is named differently).  WHERE
    filters the updates (e.g. ``u.labels['pool'] = 'j'``)."""
    g = f"coalesce({group_expr(by)}, '(none)')"
    q = _quantile(dialect)
    join = f"JOIN updates u ON x.recording_id = u.recording_id AND {_where(where)}"
    return {
        "groups": f"""SELECT {g} AS grp, COUNT(*) AS updates, COUNT(DISTINCT u.host) AS hosts,
            SUM(u.files) AS files, SUM(u.files_error) AS files_error, SUM(u.anomalies) AS anomalies,
            SUM(u.events_lost) AS events_lost, SUM(CASE WHEN u.truncated THEN 1 ELSE 0 END) AS truncated,
            {q}(u.blackout_ns, 0.5) AS blackout_p50_ns, {q}(u.blackout_ns, 0.99) AS blackout_p99_ns
            FROM updates u WHERE {_where(where)} GROUP BY 1 ORDER BY 1""",
        "errors": f"""SELECT {g} AS grp, x.handler, x.errno, x.failed_phase, COUNT(*) AS files
            FROM files x {join} WHERE x.errno IS NOT NULL GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""",
        "anomalies": f"""SELECT {g} AS grp, x.code, COUNT(*) AS anomalies, COUNT(DISTINCT x.recording_id) AS updates,
            COUNT(DISTINCT x.host) AS hosts FROM anomalies x {join} GROUP BY 1, 2 ORDER BY 1, 2""",
        "phases": f"""SELECT {g} AS grp, x.handler, x.phase, COUNT(*) AS n,
            {q}(x.duration_ns, 0.5) AS p50_ns, {q}(x.duration_ns, 0.99) AS p99_ns
            FROM phases x {join} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
    }


def _has_parts(root: str, table: str) -> bool:
    return next(fs.parts(root, table), None) is not None


def connect(root: str, memory_limit: str = MEMORY_LIMIT):
    """A DuckDB connection with every table of the dataset at ROOT as a view
    (a table with no part yet is an empty one of its schema)."""
    import duckdb
    import pyarrow as pa
    if not _has_parts(root, "updates"):
        raise LuotraceError(f"{root} holds no fleet dataset",
                            "add recordings first: luotrace export --parquet DIR RECORDING...")
    con = duckdb.connect(config={"memory_limit": memory_limit, "threads": min(4, os.cpu_count() or 1),
                                 "temp_directory": os.path.join(tempfile.gettempdir(), "luotrace-duckdb")})
    for t in fs.TABLES:
        if _has_parts(root, t):
            glob = os.path.join(root, t, "**", f"{fs.PART_PREFIX}*{fs.PART_SUFFIX}").replace("'", "''")
            con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true, "
                        "hive_types_autocast = false, union_by_name = true)")
        else:
            empty = pa.schema(list(fs.SCHEMAS[t]) + [pa.field(p, pa.string()) for p in fs.PARTITIONS]).empty_table()
            con.register(f"_{t}_empty", empty)
            con.execute(f"CREATE VIEW {t} AS SELECT * FROM _{t}_empty")
    return con


def _run(con, sql: str, params: Sequence = ()) -> Tuple[List[str], List[tuple]]:
    import duckdb
    try:
        cur = con.execute(sql, list(params))
        return [d[0] for d in cur.description], cur.fetchall()
    except duckdb.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LuotraceError(f"query failed: {msg}", "see `luotrace fleet sql --help` for the tables") from None


def _records(cols: List[str], rows: List[tuple]) -> List[dict]:
    return [dict(zip(cols, (_plain(v) for v in r))) for r in rows]


def _plain(v):
    """A value JSON can hold: numbers as numbers (DuckDB's sums are 128-bit)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if hasattr(v, "as_integer_ratio") and not isinstance(v, float):  # Decimal
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def summary(root: str, by: str = "kernel", where: Optional[str] = None) -> dict:
    """Per group: updates, hosts, files, errors by errno, anomalies by code,
    p50/p99 of every phase."""
    con = connect(root)
    out: dict = {"schema": "luotrace.fleet-summary/1", "dataset": root, "by": by, "where": where}
    for name, sql in summary_sql(by, where=where).items():
        out[name] = _records(*_run(con, sql))
    order = {p: i for i, p in enumerate(PHASE_ORDER)}
    out["phases"].sort(key=lambda r: (r["grp"], r["handler"], order.get(r["phase"], len(order)), r["phase"]))
    return out


def sql(root: str, query: str) -> Tuple[List[str], List[tuple]]:
    """Any query over the dataset's tables (views named as the tables)."""
    return _run(connect(root), query)


def sql_records(root: str, query: str) -> List[dict]:
    return _records(*sql(root, query))


def compare_sides(root: str, by: str, a: str, b: str, cap: int = SAMPLE_CAP,
                  where: Optional[str] = None) -> Tuple[Side, Side]:
    """The two groups of updates (BY = A, BY = B) as compare's sides: phase
    durations per handler (a deterministic sample of at most CAP calls per
    side and phase), folio-latency histograms summed, kernels and modes."""
    if a == b:
        raise LuotraceError(f"both sides are {by}={a}", "give two different values")
    con = connect(root)
    g = f"coalesce({group_expr(by)}, '(none)')"
    w = _where(where)
    _cols, present = _run(con, f"SELECT {g}, COUNT(*) FROM updates u WHERE {w} GROUP BY 1 ORDER BY 1")
    have = {str(v): n for v, n in present}
    for side in (a, b):
        if side not in have:
            raise LuotraceError(f"no update has {by}={side}" + (f" where {where}" if where else ""),
                                f"values of {by} in the dataset: {', '.join(sorted(have))[:200] or 'none'}")
    phases = ", ".join(f"'{p}'" for p in ("preserve",) + LEAF_PHASES)
    _c, rows = _run(con, f"""
        WITH s AS (SELECT {g} AS grp, x.handler, x.phase, x.duration_ns,
                   row_number() OVER (PARTITION BY {g}, x.handler, x.phase
                                      ORDER BY hash(x.recording_id, x.inode, x.start_ns)) AS rn,
                   COUNT(*) OVER (PARTITION BY {g}, x.handler, x.phase) AS total
                   FROM phases x JOIN updates u ON x.recording_id = u.recording_id
                   WHERE {g} IN (?, ?) AND x.phase IN ({phases}) AND {w})
        SELECT grp, handler, phase, duration_ns, total FROM s WHERE rn <= ? ORDER BY grp, handler, phase, rn""",
                    (a, b, cap))
    samples: Dict[str, Dict[Tuple[str, str], List[float]]] = {a: {}, b: {}}
    totals: Dict[str, Dict[Tuple[str, str], int]] = {a: {}, b: {}}
    for grp, handler, phase, ns, total in rows:
        samples[grp].setdefault((handler, phase), []).append(float(ns))
        totals[grp][(handler, phase)] = int(total)
    _c, hrows = _run(con, f"""SELECT {g}, x.handler, x.log2_ns, SUM(x.count) FROM folio_latency x
        JOIN updates u ON x.recording_id = u.recording_id WHERE {g} IN (?, ?) AND {w} GROUP BY 1, 2, 3""", (a, b))
    hists: Dict[str, Dict[str, np.ndarray]] = {a: {}, b: {}}
    for grp, handler, slot, n in hrows:
        if 0 <= slot < 64:
            hists[grp].setdefault(handler, np.zeros(64, dtype=np.int64))[slot] += int(n)
    _c, trows = _run(con, f"SELECT DISTINCT {g}, u.kernel_release, u.mode FROM updates u WHERE {g} IN (?, ?) AND {w}",
                     (a, b))
    sides = []
    for name in (a, b):
        traits = {"kernel": sorted({str(k) for grp, k, _m in trows if grp == name}),
                  "mode": sorted({str(m) for grp, _k, m in trows if grp == name})}
        smp = {k: np.asarray(v) for k, v in samples[name].items()}
        cut = {k: n for k, n in totals[name].items() if n > len(smp[k])}
        sides.append(Side(f"{by}={name} ({have[name]} updates)", smp, hists[name], traits, cut))
    return sides[0], sides[1]


def rows_json(cols: List[str], rows: List[tuple]) -> str:
    return json.dumps({"columns": cols, "rows": [[_plain(v) for v in r] for r in rows]}, indent=1)


def spark_views(spark, root: str) -> None:
    """The dataset's tables as temporary views of a Spark session (any
    path Spark reads: a directory, s3a://, abfss://, gs://).  Partition
    values stay strings, as DuckDB reads them."""
    spark.conf.set("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    for t in fs.TABLES:
        path = f"{root.rstrip('/')}/{t}"
        spark.read.option("basePath", path).option("mergeSchema", "true").parquet(path).createOrReplaceTempView(t)


def spark_summary(spark, root: str, by: str = "kernel", where: Optional[str] = None) -> dict:
    """summary()'s tables computed by Spark: the same SQL, the same numbers."""
    spark_views(spark, root)
    out: dict = {}
    for name, q in summary_sql(by, "spark", where).items():
        out[name] = [{k: _plain(v) for k, v in r.asDict().items()} for r in spark.sql(q).collect()]
    return out
