"""Questions across many hosts' updates, answered by an engine reading the
fleet dataset (tracer/fleet/dataset.py writes it, tracer/fleet/schema.py names its
columns): DuckDB embedded here; the same SQL text runs on Spark (see
``summary_sql``), so a cluster gives the numbers a laptop gives.

Memory stays bounded whatever the dataset's size: DuckDB streams the Parquet
parts under a memory limit (spilling to a temporary directory), and compare
draws a bounded, deterministic sample per phase."""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracer.fleet import schema as fs
from tracer.probes.catalog import LEAF_PHASES, PHASE_ORDER
from tracer.analysis.compare import Side
from tracer.base.errors import LuotraceError
from tracer.base.printable import printable

MEMORY_LIMIT = "512MB"
# calls per side and phase that compare uses: what bounds its memory and time
SAMPLE_CAP = 4000
# columns of updates a summary can group by (kernel: the exact release, not
# its lossy partition name); any other name is a label, and label:NAME is a
# label even where a column has its name
COLUMNS_BY = {"host": "u.host", "kernel": "u.kernel_release", "date": "u.date", "kernel_release": "u.kernel_release",
              "mode": "u.mode", "target": "u.target", "folio_source": "u.folio_source",
              "gmem_backing": "u.gmem_backing"}
_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def group_expr(by: str) -> str:
    """SQL for the grouping value of update row ``u``: a column, or a label."""
    if by in COLUMNS_BY:
        return COLUMNS_BY[by]
    name = by[len("label:"):] if by.startswith("label:") else by
    if not _LABEL.match(name):
        raise LuotraceError(f"bad --by '{printable(by)}'",
                            f"use a column ({', '.join(COLUMNS_BY)}), a label name such as patch, or label:NAME")
    return f"u.labels['{name}']"


def _label_of(by: str) -> Optional[str]:
    return None if by in COLUMNS_BY else by[len("label:"):] if by.startswith("label:") else by


def _quantile(dialect: str) -> str:
    # both interpolate linearly between the two nearest values (numpy's default)
    return {"duckdb": "quantile_cont", "spark": "percentile"}[dialect]


def _where(where: Optional[str]) -> str:
    """A user's filter on the updates (alias ``u``), as a SQL condition: an
    expression, never a way out of the query it is put in (one SELECT with
    it inside parses, or it is refused)."""
    if not where:
        return "TRUE"
    import duckdb
    probe = f"SELECT * FROM updates u WHERE ({where})"
    try:
        stmts = duckdb.connect().extract_statements(probe)
    except duckdb.Error as e:
        raise LuotraceError(f"bad --where: {_first_line(e)}", "give one SQL condition on u, e.g. \"u.host LIKE 'db%'\"")
    if len(stmts) != 1 or stmts[0].type != duckdb.StatementType.SELECT or stmts[0].query != probe:
        raise LuotraceError("bad --where: not one condition", "give one SQL condition on u, e.g. \"u.host LIKE 'db%'\"")
    return f"({where})"


def _first_line(e: Exception) -> str:
    return printable(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


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


def _parts(root: str, table: str, warnings: List[str]) -> List[str]:
    """TABLE's committed parts that read as Parquet of this dataset; each
    other one is one warning and left out (a half-copied part, a foreign
    file put in the manifest's place)."""
    good = []
    for p in fs.parts(root, table):
        try:
            names = pq.read_schema(p).names
        except (OSError, pa.ArrowException) as e:
            warnings.append(f"{p}: left out: not a readable Parquet part ({_first_line(e)[:120]})")
            continue
        if "recording_id" not in names:
            warnings.append(f"{p}: left out: not a part of this dataset (no recording_id)")
            continue
        good.append(p)
    return good


def connect(root: str, memory_limit: str = MEMORY_LIMIT, unsafe: bool = False,
            warnings: Optional[List[str]] = None):
    """A DuckDB connection with every table of the dataset at ROOT as a view.

    The engine never opens a file itself: each table is an Arrow dataset of
    the manifest's parts, given to DuckDB, so a path's glob characters mean
    nothing and, unless UNSAFE, DuckDB runs with file system access, extension
    installs and loads off and its configuration locked (the memory bound
    holds); its spill directory is this process's own."""
    import duckdb
    import pyarrow.dataset as pads
    warnings = [] if warnings is None else warnings
    if not os.path.isdir(root) or not next(fs.parts(root, "updates"), None):
        raise LuotraceError(f"{printable(root)} holds no fleet dataset",
                            "add recordings first: luotrace export --parquet DIR RECORDING...")
    spill = tempfile.mkdtemp(prefix="luotrace-duckdb-")  # 0700, removed when the process ends
    atexit.register(shutil.rmtree, spill, True)
    con = duckdb.connect(config={"memory_limit": memory_limit, "threads": min(4, os.cpu_count() or 1),
                                 "temp_directory": spill})
    hive = pads.partitioning(pa.schema([(p, pa.string()) for p in fs.PARTITIONS]), flavor="hive")
    for t in fs.TABLES:
        schema = pa.schema(list(fs.SCHEMAS[t]) + [pa.field(p, pa.string()) for p in fs.PARTITIONS])
        files = _parts(root, t, warnings)
        data = pads.dataset(files, schema=schema, partitioning=hive, partition_base_dir=os.path.join(root, t)) \
            if files else schema.empty_table()
        con.register(f"_{t}_parts", data)
        con.execute(f"CREATE VIEW {t} AS SELECT * FROM _{t}_parts")
    if not unsafe:
        for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
            con.execute(f"SET {setting} = false")
        con.execute("SET lock_configuration = true")
    return con


def _run(con, sql: str, params: Sequence = ()) -> Tuple[List[str], List[tuple]]:
    import duckdb
    try:
        cur = con.execute(sql, list(params))
        return [d[0] for d in cur.description], cur.fetchall()
    except duckdb.Error as e:
        raise LuotraceError(f"query failed: {_first_line(e)}", "see `luotrace fleet sql --help` for the tables") from None


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


def _label_known(con, by: str, where: Optional[str]) -> None:
    """A --by label no update has is a typo more often than a finding."""
    label = _label_of(by)
    if label is None:
        return
    _c, rows = _run(con, f"SELECT count(*) FROM updates u WHERE {_where(where)} AND u.labels['{label}'] IS NOT NULL")
    if rows[0][0]:
        return
    _c, names = _run(con, "SELECT DISTINCT unnest(map_keys(u.labels)) FROM updates u ORDER BY 1 LIMIT 50")
    raise LuotraceError(f"no update has the label '{label}'" + (f" where {printable(where)}" if where else ""),
                        f"labels in the dataset: {printable(', '.join(str(n[0]) for n in names)) or 'none'}; "
                        f"columns: {', '.join(COLUMNS_BY)}")


def summary(root: str, by: str = "kernel", where: Optional[str] = None) -> dict:
    """Per group: updates, hosts, files, errors by errno, anomalies by code,
    p50/p99 of every phase."""
    warnings: List[str] = []
    con = connect(root, warnings=warnings)
    queries = summary_sql(by, where=where)
    _label_known(con, by, where)
    out: dict = {"schema": "luotrace.fleet-summary/1", "dataset": root, "by": by, "where": where}
    for name, sql in queries.items():
        out[name] = _records(*_run(con, sql))
    out["warnings"] = warnings
    order = {p: i for i, p in enumerate(PHASE_ORDER)}
    out["phases"].sort(key=lambda r: (r["grp"], r["handler"], order.get(r["phase"], len(order)), r["phase"]))
    return out


def sql(root: str, query: str, unsafe: bool = False,
        warnings: Optional[List[str]] = None) -> Tuple[List[str], List[tuple]]:
    """One SELECT over the dataset's tables (views named as the tables), in
    the sandbox connect() sets up; UNSAFE: any DuckDB SQL, as the user."""
    import duckdb
    con = connect(root, unsafe=unsafe, warnings=warnings)
    if not unsafe:
        try:
            stmts = con.extract_statements(query)
        except duckdb.Error as e:
            raise LuotraceError(f"query failed: {_first_line(e)}", "see `luotrace fleet sql --help` for the tables") from None
        if len(stmts) != 1 or stmts[0].type != duckdb.StatementType.SELECT:
            kinds = ", ".join(str(s.type).rsplit(".", 1)[-1] for s in stmts) or "none"
            raise LuotraceError(f"refused: one SELECT is run over the dataset, this is {len(stmts)} statement(s): {kinds}",
                                "give one SELECT (or --unsafe for DuckDB whole, as your user)")
    return _run(con, query)


def sql_records(root: str, query: str) -> List[dict]:
    return _records(*sql(root, query))


def compare_sides(root: str, by: str, a: str, b: str, cap: int = SAMPLE_CAP,
                  where: Optional[str] = None, warnings: Optional[List[str]] = None) -> Tuple[Side, Side]:
    """The two groups of updates (BY = A, BY = B) as compare's sides: phase
    durations per handler (a deterministic sample of at most CAP calls per
    side and phase), folio-latency histograms summed, kernels and modes."""
    if a == b:
        raise LuotraceError(f"both sides are {by}={printable(a)}", "give two different values")
    con = connect(root, warnings=warnings)
    g = f"coalesce({group_expr(by)}, '(none)')"
    w = _where(where)
    _label_known(con, by, where)
    _cols, present = _run(con, f"SELECT {g}, COUNT(*) FROM updates u WHERE {w} GROUP BY 1 ORDER BY 1")
    have = {str(v): n for v, n in present}
    for side in (a, b):
        if side not in have:
            raise LuotraceError(f"no update has {by}={printable(side)}" + (f" where {printable(where)}" if where else ""),
                                f"values of {by} in the dataset: {printable(', '.join(sorted(have))[:200]) or 'none'}")
    phases = ", ".join(f"'{p}'" for p in ("preserve",) + LEAF_PHASES)
    _c, rows = _run(con, f"""
        WITH s AS (SELECT {g} AS grp, x.handler, x.phase, x.duration_ns, x.recording_id, x.start_ns,
                   row_number() OVER (PARTITION BY {g}, x.handler, x.phase
                                      ORDER BY hash(x.recording_id, x.inode, x.start_ns)) AS rn,
                   COUNT(*) OVER (PARTITION BY {g}, x.handler, x.phase) AS total
                   FROM phases x JOIN updates u ON x.recording_id = u.recording_id
                   WHERE {g} IN (?, ?) AND x.phase IN ({phases}) AND {w})
        SELECT grp, handler, phase, duration_ns, total, recording_id FROM s WHERE rn <= ?
        ORDER BY grp, handler, phase, recording_id, start_ns""", (a, b, cap))
    samples: Dict[str, Dict[Tuple[str, str], List[float]]] = {a: {}, b: {}}
    runs: Dict[str, Dict[Tuple[str, str], List[int]]] = {a: {}, b: {}}
    run_ids: Dict[str, Dict[str, int]] = {a: {}, b: {}}  # the update is the run
    totals: Dict[str, Dict[Tuple[str, str], int]] = {a: {}, b: {}}
    for grp, handler, phase, ns, total, rid in rows:
        samples[grp].setdefault((handler, phase), []).append(float(ns))
        runs[grp].setdefault((handler, phase), []).append(run_ids[grp].setdefault(rid, len(run_ids[grp])))
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
        sides.append(Side(f"{by}={name} ({have[name]} updates)", smp, hists[name], traits, cut,
                          runs={k: np.asarray(v, dtype=np.int64) for k, v in runs[name].items()},
                          run_names=[f"update {rid[:12]}" for rid in run_ids[name]]))
    return sides[0], sides[1]


def rows_json(cols: List[str], rows: List[tuple]) -> str:
    return json.dumps({"columns": cols, "rows": [[_plain(v) for v in r] for r in rows]}, indent=1)


def spark_views(spark, root: str) -> None:
    """The dataset's tables as temporary views of a Spark session (any
    path Spark reads: a directory, s3a://, abfss://, gs://): the parts the
    manifest names, never a part of an export under way.  Partition values
    stay strings, as DuckDB reads them."""
    spark.conf.set("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    base = root.rstrip("/")
    text = "".join(r.value for r in spark.read.text(f"{base}/{fs.META}/{fs.MANIFEST}", wholetext=True).collect())
    parts = json.loads(text)["parts"]
    for t in fs.TABLES:
        path = f"{base}/{t}"
        files = [f"{base}/{rel}" for rel in parts.get(t, [])]
        if files:
            spark.read.option("basePath", path).option("mergeSchema", "true").parquet(*files).createOrReplaceTempView(t)
        else:
            schema = pa.schema(list(fs.SCHEMAS[t]) + [pa.field(p, pa.string()) for p in fs.PARTITIONS])
            spark.createDataFrame(schema.empty_table().to_pandas()).createOrReplaceTempView(t)


def spark_summary(spark, root: str, by: str = "kernel", where: Optional[str] = None) -> dict:
    """summary()'s tables computed by Spark: the same SQL, the same numbers."""
    spark_views(spark, root)
    out: dict = {}
    for name, q in summary_sql(by, "spark", where).items():
        out[name] = [{k: _plain(v) for k, v in r.asDict().items()} for r in spark.sql(q).collect()]
    return out
