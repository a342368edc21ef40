"""The fleet dataset under crashes, hostile recordings and untrusted SQL
(issue 28): an export killed at every write point in turn, its workers
killed, values no column takes, damaged and foreign parts, SQL that tries to
leave the dataset, glob characters, terminal escapes, and the keys of --by."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, run_cli
from tracer.fleet import dataset
from tracer.fleet import query as fleet
from tracer.recording import format as rec
from tracer.fleet import schema as fs
from tracer.base.errors import LuotraceError
from tracer.analysis.simulate import SimSpec, simulate

T0 = 1_796_000_000 * 10 ** 9
DAY = 86400 * 10 ** 9


def _sim(d, name: str, seed: int, **kw) -> str:
    path = str(d / f"{name}.luo")
    kw.setdefault("kernel", "7.2.13-luo")
    kw.setdefault("hostname", f"host{seed % 3}")
    kw.setdefault("started_ns", T0 + seed * DAY // 2)
    simulate(SimSpec(files=2, size=8 << 20, seed=seed, labels={"patch": f"v{seed % 2}"}, **kw), path,
             progress=lambda s: None)
    return path


def _counts(root: str) -> dict:
    return {t: fleet.sql_records(root, f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in fs.TABLES}


def _ours(root: str) -> set:
    """Every file under ROOT outside the metadata directory."""
    return {os.path.relpath(os.path.join(d, n), root) for d, _s, ns in os.walk(root) for n in ns
            if not os.path.relpath(d, root).startswith(fs.META)}


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    """Five recordings over three dates and two kernels."""
    d = tmp_path_factory.mktemp("hard")
    return [_sim(d, f"r{i}", i, kernel="7.2.13-a" if i % 2 else "7.2.13-b") for i in range(5)]


@pytest.fixture(scope="module")
def expected(five, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("whole") / "ds")
    assert dataset.export(root, five).added == 5
    return _counts(root)


_CRASH = """
import os, sys
import pyarrow.parquet as pq
from tracer.fleet import dataset
n = int(sys.argv[1]); hit = [0]
def point(f):
    def g(*a, **k):
        hit[0] += 1
        if hit[0] == n:
            os._exit(137)  # as SIGKILL would: no cleanup of any kind
        return f(*a, **k)
    return g
os.rename, os.unlink, os.fsync = point(os.rename), point(os.unlink), point(os.fsync)
pq.write_table = point(pq.write_table)
dataset.export(sys.argv[2], sys.argv[3:], batch=2)
print("finished")
"""


def test_an_export_killed_at_every_write_point_counts_each_recording_once(five, expected, tmp_path):
    """The export is killed at its 1st, 2nd, ... write, rename, fsync or
    unlink, in a dataset that already holds two recordings; each time the
    next export leaves every recording exactly once, no stray file, the lock
    free."""
    n = 0
    while True:
        n += 1
        root = str(tmp_path / f"ds{n}")
        assert dataset.export(root, five[:2]).added == 2
        r = subprocess.run([sys.executable, "-c", _CRASH, str(n), root, *five], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        if r.returncode == 0:
            assert "finished" in r.stdout
            break
        assert r.returncode == 137, r.stderr
        res = dataset.export(root, five)
        assert res.added + res.already == 5 and not res.skipped, (n, res)
        assert _counts(root) == expected, n
        named = {p for ps in fs.read_manifest(root).values() for p in ps}
        assert _ours(root) == named, (n, _ours(root) - named)
        assert sorted(os.listdir(os.path.join(root, fs.META))) == [dataset.LOCK, fs.MANIFEST]
        assert n < 200
    assert n > 10  # the batches of two, over partitions, gave many points to die at


def test_a_larger_copy_replaces_a_truncated_one(five, expected, tmp_path):
    whole = open(five[3], "rb").read()
    cut = tmp_path / "cut.luo"
    h = rec.header_end(whole)
    cut.write_bytes(whole[: h + (len(whole) - h) // 2])
    root = str(tmp_path / "ds")
    res = dataset.export(root, [str(cut)] + five[:3])
    assert res.added == 4
    res = dataset.export(root, five)
    assert (res.added, res.replaced, res.already) == (1, 1, 3), res
    assert any("replace" in w for w in res.warnings)
    assert _counts(root) == expected
    ups = fleet.sql_records(root, "SELECT recording_bytes, truncated FROM updates")
    assert not any(u["truncated"] for u in ups) and len(ups) == 5
    # the truncated copy again: the larger one stays
    res = dataset.export(root, [str(cut)])
    assert res.already == 1 and "larger copy" in res.warnings[-1] and _counts(root) == expected


def test_values_no_column_takes_cost_only_their_recording(five, tmp_path):
    big = _sim(tmp_path, "big", 7, started_ns=2 ** 64 - 1)
    surrogate = _sim(tmp_path, "sur", 8, hostname="h\udcff")
    root = str(tmp_path / "ds")
    r = run_cli("export", "--parquet", root, big, surrogate, *five[:2], str(tmp_path), "/nonexistent.luo")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert any("big.luo: skipped" in w and "64-bit" in w for w in warn), warn
    assert any(str(tmp_path) + ": skipped: a directory" in w for w in warn) and \
        any("nonexistent.luo: skipped" in w for w in warn)
    assert "3 recording(s) added" in r.stderr and "3 unreadable" in r.stderr
    assert {u["host"] for u in fleet.sql_records(root, "SELECT host FROM updates")} == {"h\\udcff", "host0", "host1"}


def test_a_fifo_is_skipped_not_waited_on(five, tmp_path):
    fifo = str(tmp_path / "pipe.luo")
    os.mkfifo(fifo)
    res = dataset.export(str(tmp_path / "ds"), [fifo, five[0]])
    assert (res.added, res.skipped) == (1, 1) and "not a regular file" in res.warnings[0]


def _children(pid: int) -> list:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    return [_sim(d, f"m{i}", 100 + i) for i in range(70)]


def test_a_killed_export_leaves_no_worker_holding_the_lock(many, tmp_path):
    root = str(tmp_path / "ds")
    code = f"from tracer.fleet import dataset; import sys; dataset.export({root!r}, sys.argv[1:], jobs=2)"
    p = subprocess.Popen([sys.executable, "-c", code, *many], cwd=REPO)
    deadline = time.monotonic() + 60
    while len(_children(p.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(p.pid)
    assert workers, "no worker started"
    p.send_signal(signal.SIGKILL)
    p.wait()
    for w in workers:
        for _ in range(100):
            if not os.path.exists(f"/proc/{w}") or open(f"/proc/{w}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"worker {w} outlived the export")
    res = dataset.export(root, many, jobs=2)
    assert res.added == 70 and _counts(root)["updates"] == 70


def test_a_worker_killed_is_one_line_and_nothing_is_lost(many, tmp_path):
    """A worker killed while it reads (as the OOM killer would)."""
    root = str(tmp_path / "ds")
    killed = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            kids = [k for k in _children(os.getpid())
                    if "spawn_main" in open(f"/proc/{k}/cmdline").read().replace("\0", " ")]
            if kids:
                os.kill(kids[0], signal.SIGKILL)
                killed.append(kids[0])
                return
            time.sleep(0.01)
    t = threading.Thread(target=killer)
    t.start()
    res = dataset.export(root, many, jobs=2)
    t.join()
    assert killed and res.added == 70 and not res.skipped, res
    assert sum("worker" in w and "died" in w for w in res.warnings) == 1, res.warnings
    assert _counts(root)["updates"] == 70


def test_only_this_tools_files_are_ever_removed(five, expected, tmp_path):
    root = tmp_path / "ds"
    dataset.export(str(root), five[:1])
    foreign = root / "files" / "part-00000-5e1d-c000.snappy.parquet"
    pq.write_table(pa.table({"x": [1]}), str(foreign))
    hidden = root / "updates" / ".part-x.parquet.tmp"
    hidden.write_bytes(b"someone else's")
    res = dataset.export(str(root), five)
    assert foreign.exists() and hidden.exists() and res.added == 4
    assert _counts(str(root)) == expected  # and neither is read


def test_damaged_and_foreign_parts_are_one_line_each(five, tmp_path):
    root = str(tmp_path / "ds")
    dataset.export(root, five)
    m = fs.read_manifest(root)
    damaged = os.path.join(root, m["phases"][0])
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    pq.write_table(pa.table({"x": [1]}), os.path.join(root, m["anomalies"][0]) if m["anomalies"] else
                   os.path.join(root, m["sessions"][0]))
    for argv in (["fleet", root], ["fleet", "sql", root, "SELECT count(*) FROM phases"],
                 ["fleet", "compare", root, "--by", "patch", "v0", "v1"]):
        r = run_cli(*argv)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (argv, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if "left out" in ln]
        assert len(lines) == 2 and any(m["phases"][0] in ln for ln in lines), (argv, r.stderr)
    r = run_cli("export", "--parquet", root, five[0])
    assert r.returncode == 0 and "1 already there" in r.stderr and "Traceback" not in r.stderr


ESCAPES = [
    "SELECT * FROM read_text('/etc/passwd')",
    "COPY (SELECT 1) TO '{out}/copied.csv'",
    "ATTACH '{out}/new.db'",
    "SELECT 1; COPY (SELECT 1) TO '{out}/second.csv'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET memory_limit = '64GB'",
    "CREATE TABLE t AS SELECT 1",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('{out}/*.parquet')",
]


@pytest.mark.parametrize("query", ESCAPES)
def test_sql_escapes_fail_in_one_line_and_leave_nothing(five, tmp_path, query):
    root = str(tmp_path / "ds")
    dataset.export(root, five[:2])
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("fleet", "sql", root, query.format(out=out))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "passwd" not in r.stdout and not os.listdir(out)


def test_where_is_an_expression_never_a_way_out(five, tmp_path):
    root = str(tmp_path / "ds")
    dataset.export(root, five[:2])
    target = tmp_path / "written.csv"
    for where in (f"TRUE) ; COPY (SELECT 1) TO '{target}'; SELECT (TRUE",
                  "u.host IN (SELECT content FROM read_text('/etc/passwd'))"):
        for argv in (["fleet", root, "--where", where], ["fleet", "compare", root, "--by", "patch", "v0", "v1",
                                                          "--where", where]):
            r = run_cli(*argv)
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not target.exists()
    # and a plain condition still filters
    assert sum(g["updates"] for g in fleet.summary(root, where="u.host = 'host0'")["groups"]) == 1


def test_unsafe_is_duckdb_whole(five, tmp_path):
    root = str(tmp_path / "ds")
    dataset.export(root, five[:2])
    r = run_cli("fleet", "sql", root, "SELECT count(*) AS n FROM read_text('/etc/hostname')", "--unsafe", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rows"] == [[1]], r.stderr


def test_the_spill_directory_is_private(five, tmp_path):
    root = str(tmp_path / "ds")
    dataset.export(root, five[:1])
    con = fleet.connect(root)
    spill = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
    st = os.stat(spill)
    assert st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0 and not os.path.islink(spill)


def test_a_dataset_path_with_glob_characters_reads_only_itself(five, tmp_path):
    for name in ("ds[1]", "ds*"):
        dataset.export(str(tmp_path / name), five[:1] if name == "ds[1]" else five[1:3])
    dataset.export(str(tmp_path / "ds1"), five[3:])
    assert _counts(str(tmp_path / "ds[1]"))["updates"] == 1
    assert _counts(str(tmp_path / "ds*"))["updates"] == 2


def test_terminal_escapes_are_shown_escaped(five, tmp_path):
    """A hostname with an OSC sequence (an older recording: the header
    schema refuses it now) reaches no terminal as one."""
    root = str(tmp_path / "ds")
    dataset.export(root, five[:1])
    p = fs.read_manifest(root)["updates"][0]
    t = pq.read_table(os.path.join(root, p))
    host = "\x1b]0;owned\x07evil"
    t = t.set_column(t.schema.get_field_index("host"), "host", pa.array([host] * t.num_rows))
    pq.write_table(t, os.path.join(root, p))
    for argv in (["fleet", root, "--by", "host"], ["fleet", "sql", root, "SELECT host FROM updates"],
                 ["fleet", "compare", root, "--by", "host", host, "nobody"]):
        r = run_cli(*argv)
        assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr, argv
        assert "\\x1b]0;owned\\x07evil" in r.stdout + r.stderr, (argv, r.stdout, r.stderr)
    bad = _sim(tmp_path, "esc", 9, hostname=host)
    r = run_cli("export", "--parquet", str(tmp_path / "ds2"), bad)
    assert r.returncode == 1 and "hostname" in r.stderr and "\x1b" not in r.stderr


def test_by_a_key_nobody_has_says_so_and_labels_can_shadow_columns(tmp_path):
    paths = [_sim(tmp_path, f"k{i}", i, kernel=k) for i, k in enumerate(("7.2/a", "7.2=a", "7.2 a"))]
    paths.append(str(tmp_path / "t.luo"))
    simulate(SimSpec(files=1, size=4 << 20, seed=5, labels={"target": "blue"}, started_ns=T0), paths[-1],
             progress=lambda s: None)
    root = str(tmp_path / "ds")
    dataset.export(root, paths)
    kernels = {g["grp"]: g["updates"] for g in fleet.summary(root, "kernel")["groups"]}
    assert {k: n for k, n in kernels.items() if k.startswith("7.2")} == {"7.2/a": 1, "7.2=a": 1, "7.2 a": 1}
    for by in ("pacth", "Patch", "label:mode"):
        with pytest.raises(LuotraceError, match="no update has the label"):
            fleet.summary(root, by)
    assert {g["grp"] for g in fleet.summary(root, "label:target")["groups"]} == {"blue", "(none)"}
    assert {g["grp"] for g in fleet.summary(root, "target")["groups"]} == {"simulate"}
    r = run_cli("fleet", root, "--by", "pacth")
    assert r.returncode == 1 and "labels in the dataset: patch, target" in r.stderr
    assert fs.partition_value("__HIVE_DEFAULT_PARTITION__") != "__HIVE_DEFAULT_PARTITION__"


def test_an_older_dataset_is_refused_in_one_line(tmp_path):
    old = tmp_path / "old" / "updates" / "date=x" / "kernel=y"
    old.mkdir(parents=True)
    pq.write_table(pa.table({"recording_id": ["a"]}), str(old / "part-0123.parquet"))
    for argv in (["fleet", str(tmp_path / "old")], ["export", "--parquet", str(tmp_path / "old"), "/nonexistent"]):
        r = run_cli(*argv)
        assert r.returncode == 1 and "older luotrace" in r.stderr and r.stderr.count("\n") == 1, r.stderr
