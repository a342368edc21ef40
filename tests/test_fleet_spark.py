"""The fleet dataset read by Spark (local mode, Debian's JRE), as a cluster
reads it: the summary's SQL run by Spark gives DuckDB's numbers, row for row.
Marked `spark`: a JVM start (~10 s), kept out of `make check`."""
from __future__ import annotations

import os
import shutil

import pytest

from tracer.fleet import dataset
from tracer.fleet import query as fleet
from tracer.analysis.simulate import SimSpec, simulate

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def spark():
    if not shutil.which("java"):
        pytest.fail("environment not ready: no java for Spark (openjdk-17-jre-headless; run `make setup`)")
    from pyspark.sql import SparkSession
    s = (SparkSession.builder.master("local[2]").appName("luotrace-fleet-test")
         .config("spark.ui.enabled", "false").config("spark.driver.memory", "1g")
         .config("spark.sql.shuffle.partitions", "4").getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """Forty updates of ten hosts, two kernels, three patch revisions, some
    failing, some with anomalies, one a slowed fill pass, over three days."""
    d = tmp_path_factory.mktemp("sparkds")
    paths = []
    for i in range(40):
        p = str(d / f"r{i}.luo")
        simulate(SimSpec(files=2 + i % 3, size=(8 + 8 * (i % 4)) << 20, seed=i, hostname=f"host{i % 10}",
                         kernel="7.2.13-seed" if i % 2 else "7.2.13-latest", labels={"patch": f"v{2 + i % 3}"},
                         started_ns=1_796_000_000 * 10 ** 9 + i * 7200 * 10 ** 9,
                         errors=1 if i % 9 == 0 else 0, anomalies=["holes"] if i % 7 == 0 else [],
                         phase_scale={"fill_pass": 1.5} if i % 3 == 1 else {}),
                 p, progress=lambda s: None)
        paths.append(p)
    root = str(d / "ds")
    assert dataset.export(root, paths).added == 40
    return root


def _key(r: dict) -> tuple:
    return tuple(str(v) for v in r.values())


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) or isinstance(y[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-9), (k, x, y)
            else:
                assert x[k] == y[k], (k, x, y)


@pytest.mark.parametrize("by", ["kernel", "patch", "host", "date"])
def test_spark_answers_the_summary_with_duckdbs_numbers(spark, ds, by):
    theirs = fleet.spark_summary(spark, ds, by)
    ours = fleet.summary(ds, by)
    ours["phases"].sort(key=_key)  # summary() lists phases in lifecycle order, the SQL by name
    for name in ("groups", "errors", "anomalies", "phases"):
        _same(ours[name], sorted(theirs[name], key=_key) if name == "phases" else theirs[name])
    assert sum(g["updates"] for g in ours["groups"]) == 40
    assert ours["errors"] and ours["anomalies"]


def test_spark_reads_the_partitions_as_strings(spark, ds):
    fleet.spark_views(spark, ds)
    rows = spark.sql("SELECT kernel, date, count(*) AS n FROM updates GROUP BY 1, 2 ORDER BY 1, 2").collect()
    assert {r["kernel"] for r in rows} == {"7.2.13-seed", "7.2.13-latest"}
    assert all(isinstance(r["date"], str) for r in rows) and sum(r["n"] for r in rows) == 40
    assert os.path.isdir(os.path.join(ds, "updates", "date=2026-12-01"))
