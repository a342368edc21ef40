"""Recordings: cut short anywhere, corrupt, foreign or from the future, they
give a report or one clean error, never a traceback."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.recording import format as rec
from tracer.live.model import run_model
from tracer.base.errors import LuotraceError
from tracer.probes.events import EVENT_SIZE
from tracer.analysis.replay import replay, report_of


MIN_HEADER = json.dumps({"format": "luotrace.recording", "mode": "folio",
                         "clock": {"base_monotonic_ns": 0, "base_realtime_ns": 0}}).encode()


def v1(blob: bytes) -> bytes:
    """A version-1 file (no checksums) holding BLOB after a minimal header."""
    return rec.PREAMBLE.pack(rec.MAGIC, 1, 0, len(MIN_HEADER)) + MIN_HEADER + blob


@pytest.fixture(scope="module")
def real(model, gmem, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rec") / "r.luo")
    res, _truth = run_model("folio", ["kexec:gmem:1M,memfd:256K", "cancel:gmem:512K"], out, model=model,
                            progress=lambda s: None)
    with open(out, "rb") as f:
        return res.report, f.read()


def event_chunk_ends(data: bytes):
    """(end offset of each whole record) for every record in the file."""
    ends = []
    for kind, _pos, start, length in rec.walk(data):
        if kind == rec.CH_EVENTS:
            ends += [start + EVENT_SIZE * (i + 1) for i in range(length // EVENT_SIZE)]
    return ends


def test_whole_file_replays_to_the_live_report(real):
    report, data = real
    r = rec.parse(data)
    assert not r.truncated and r.end is not None and r.maps is not None
    assert report_of(r) == report


def test_cut_at_every_offset_of_the_last_4k(real):
    report, data = real
    ends = event_chunk_ends(data)
    assert len(ends) == report["events"]["received"]
    for cut in range(max(0, len(data) - 4096), len(data)):
        try:
            r = rec.parse(data[:cut])
        except LuotraceError as e:
            assert "\n" not in str(e)
            continue
        assert r.truncated
        assert len(r.events) == sum(1 for e in ends if e <= cut)  # every whole record recovered
        rep = report_of(r)
        assert rep["truncated"] and rep["truncated_reason"]


def test_a_length_running_past_the_end_stops_the_reading_there(real):
    """An event chunk's length field damaged to run past the end of the file:
    the map dump and trailer after it are not read as events (issue 28)."""
    report, data = real
    chunks = [c for c in rec.walk(data) if c[0] == rec.CH_EVENTS]
    kind, pos, start, length = chunks[-1]
    bad = bytearray(data)
    struct.pack_into("<I", bad, pos + 4, len(data) - start + 4 * EVENT_SIZE)
    r = rec.parse(bytes(bad))
    before = sum(c[3] // EVENT_SIZE for c in chunks[:-1])
    assert r.truncated and "runs past the end" in r.truncated_reason
    assert len(r.events) == before < report["events"]["received"]
    assert r.end is None  # the trailer after it is not read (as events or otherwise)


def test_cut_everywhere_in_the_header_is_a_clean_error(real):
    _report, data = real
    for cut in range(0, rec.header_end(data), 7):
        with pytest.raises(LuotraceError):
            rec.parse(data[:cut])


def test_killed_recording_reports_truncated(real, tmp_path):
    report, data = real
    # a recording killed before its trailer: header + events only
    ends = event_chunk_ends(data)
    p = tmp_path / "killed.luo"
    p.write_bytes(data[: ends[-1]])
    rep = replay(str(p))
    assert rep["truncated"] and "not closed" in rep["truncated_reason"]
    assert rep["events"]["received"] == report["events"]["received"]
    assert [f["inode"] for f in rep["files"]] == [f["inode"] for f in report["files"]]


def test_newer_version_and_foreign_files(real):
    _report, data = real
    newer = bytearray(data)
    struct.pack_into("<H", newer, 8, rec.VERSION + 1)
    with pytest.raises(LuotraceError, match="newer"):
        rec.parse(bytes(newer))
    with pytest.raises(LuotraceError, match="not a luotrace recording"):
        rec.parse(b"\x7fELF" + b"\0" * 100)
    bad_json = rec.PREAMBLE.pack(rec.MAGIC, 1, 0, 5) + b"{oops"
    with pytest.raises(LuotraceError, match="corrupt"):
        rec.parse(bad_json)
    with pytest.raises(LuotraceError, match="chunk type 9"):
        rec.parse(v1(rec.CHUNK_V1.pack(9, 0)))
    with pytest.raises(LuotraceError, match="chunk type 9"):
        rec.parse(rec.preamble(MIN_HEADER) + rec.frame(9, b""))


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_recordings_give_reports_or_clean_errors(real, data):
    _report, blob = real
    b = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        b = b[: data.draw(st.integers(0, len(b)))]
    try:
        rep = report_of(rec.parse(bytes(b)))
    except LuotraceError as e:
        assert "\n" not in str(e)
        return
    json.dumps(rep)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048), st.booleans())
def test_random_bytes(blob, framed):
    """Random chunks after a good header: unframed (version 1, no checksum
    to stop them) or framed with a good checksum (version 2)."""
    data = rec.preamble(MIN_HEADER) + rec.frame(blob[0] % 4 if blob else 1, blob[1:]) if framed else v1(blob)
    try:
        rep = report_of(rec.parse(data))
    except LuotraceError as e:
        assert "\n" not in str(e)
        return
    json.dumps(rep)
