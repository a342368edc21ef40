"""serve's state directory: bounded retention (count and bytes), this boot's
recording never removed, names that are not luotrace's left alone, and a
map-dump union so that a serve's retired files survive in its recording."""
from __future__ import annotations

import os

import pytest

from tracer.recording import format as rec
from tracer.base.errors import LuotraceError
from tracer.live.state import StateDir


def _put(d, name: str, size: int, mtime: int) -> str:
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(b"x" * size)
    os.utime(p, ns=(mtime * 10**9, mtime * 10**9))
    return p


def test_retention_keeps_the_newest_by_count_and_bytes_never_the_current(tmp_path):
    d = str(tmp_path)
    paths = [_put(d, f"boot-{i:08x}-0000-4000-8000-000000000000-20261126T10000{i}.luo", 1000, 100 + i)
             for i in range(6)]
    other = _put(d, "notes.txt", 10, 1)  # not luotrace's: never touched
    st = StateDir(d, keep=4, max_bytes=10**6, progress=lambda s: None)
    assert st.recordings() == paths
    assert st.prune(current=paths[-1]) == paths[:2]
    assert st.recordings() == paths[2:] and os.path.exists(other)
    st.max_bytes = 2500  # now bytes bind: two of 1000 fit
    assert st.prune(current=paths[2]) == paths[3:5]  # the oldest is current: kept, the next ones go
    assert st.recordings() == [paths[2], paths[5]]


def test_a_new_recording_path_is_named_for_this_boot_and_never_reused(tmp_path):
    st = StateDir(str(tmp_path), progress=lambda s: None)
    a = st.new_recording()
    open(a, "w").close()
    b = st.new_recording()
    assert a != b and os.path.basename(a).startswith(f"boot-{st.boot_id}-")
    assert st.recordings() == [a]


def test_no_previous_boot_when_there_is_none(tmp_path):
    st = StateDir(str(tmp_path), progress=lambda s: None)
    open(st.new_recording(), "w").close()  # this boot's: never the previous one
    assert st.previous_boot() is None


def test_bad_state_dirs_are_one_line_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(LuotraceError, match="cannot create --state-dir"):
        StateDir(str(f / "sub"))
    with pytest.raises(LuotraceError, match="at least 1"):
        StateDir(str(tmp_path), keep=0)


def test_map_dumps_merge_per_file_so_retired_rows_survive():
    def row(ino: int, n: int) -> dict:
        return {"handler": 1, "dev": 5, "ino": ino, "preserved": n}
    first = {"counters": {"a": 1}, "folio_stats": [row(1, 10), row(2, 20)],
             "folio_hist": [{"handler": 1, "dev": 5, "ino": 1, "slot": 3, "count": 7}]}
    later = {"counters": {"a": 2}, "folio_stats": [row(2, 25), row(3, 30)], "folio_hist": []}
    m = rec.newer_maps(first, later)
    assert m["counters"] == {"a": 2}
    assert sorted((r["ino"], r["preserved"]) for r in m["folio_stats"]) == [(1, 10), (2, 25), (3, 30)]
    assert m["folio_hist"] == first["folio_hist"]
    assert rec.newer_maps(None, later) is later
