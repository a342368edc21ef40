"""A seeded fuzzer over every command that reads a recording: bytes flipped
in events, JSON parts (header, map dumps, trailer) given type-confused
values, out-of-range integers, NaN and infinities, deep nesting, missing and
extra fields, and the checksums recomputed so that the parsers, not the
CRC, meet the damage.  Every run must end in a report or a one-line error:
no traceback, no hang."""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.recording import format as rec
from tracer.cli.commands import main
from tracer.live.model import run_model
from tracer.probes.events import EVENT_DTYPE

DEEP = "__luotrace_deep__"
COMMANDS = (["report", "{a}"], ["report", "--json", "{a}"], ["report", "--events", "{a}"],
            ["report", "{a}", "{good}"], ["export", "{a}", "--textfile", "{out}.prom"],
            ["timeline", "{a}", "-o", "{out}.json"], ["compare", "{good}", "{a}"])


@pytest.fixture(scope="module")
def parts(model, gmem, tmp_path_factory):
    """A real recording taken apart: header and (type, payload) chunks."""
    d = tmp_path_factory.mktemp("fuzz")
    good = str(d / "good.luo")
    run_model("folio", ["kexec:gmem:512K,memfd:256K", "cancel:gmem:256K"], good, model=model,
              progress=lambda s: None)
    data = open(good, "rb").read()
    header = json.loads(data[rec.header_end(data) - rec.PREAMBLE.unpack_from(data, 0)[3]: rec.header_end(data)])
    chunks = [(kind, bytes(data[start: start + length])) for kind, _pos, start, length in rec.walk(data)]
    return good, header, chunks, d


def _paths(obj, path=()):
    """Every (path) into a JSON object, the root included."""
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, path + (i,))


def _set(obj, path, value):
    if not path:
        return obj if value is _DELETE else value
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    if value is _DELETE and isinstance(cur, dict):
        del cur[path[-1]]
    elif value is not _DELETE:
        cur[path[-1]] = value
    return obj


_DELETE = object()
ODD_VALUES = st.one_of(
    st.integers(-2 ** 70, 2 ** 70), st.sampled_from([-1, 2 ** 64, 2 ** 63, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    st.text(max_size=12), st.sampled_from(["\n\x1b[31m", "é" * 300]), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.just(DEEP), st.just(_DELETE))


def _dumps(obj) -> bytes:
    """JSON as a broken writer might produce it: NaN and Infinity allowed,
    the DEEP marker replaced by 20,000 levels of nesting."""
    s = json.dumps(obj, allow_nan=True)
    return s.replace(json.dumps(DEEP), "[" * 20000 + "]" * 20000).encode()


def _run(argv):
    """luotrace ARGV in this process: (exit code, stdout, stderr); an
    exception escaping main() is a traceback the user would see."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def _alarm(_sig, _frame):
    raise TimeoutError("a command hung on a mutated recording")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=int(os.environ.get("FUZZ_N", "200")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(st.data())
def test_mutated_recordings_never_traceback(parts, data):
    good, header, chunks, d = parts
    header = json.loads(json.dumps(header))
    chunks = list(chunks)
    target = data.draw(st.sampled_from(["header", "maps", "trailer", "events", "bytes"]))
    command = data.draw(st.sampled_from(COMMANDS))
    if "{good}" in command and command[0] == "report":  # joined: a recording of another boot
        header["clock"]["boot_id"] = "00000000-0000-0000-0000-00000000f022"
    blob_header = json.dumps(header).encode()
    if target in ("header", "maps", "trailer"):
        if target == "header":
            obj = header
        else:
            kind = rec.CH_MAPS if target == "maps" else rec.CH_END
            idx = data.draw(st.sampled_from([i for i, (k, _b) in enumerate(chunks) if k == kind]))
            obj = json.loads(chunks[idx][1])
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(list(_paths(obj))))
            obj = _set(obj, path, data.draw(ODD_VALUES))
        blob = _dumps(obj)
        if target == "header":
            blob_header = blob
        else:
            chunks[idx] = (chunks[idx][0], blob)
    elif target == "events":
        idx = data.draw(st.sampled_from([i for i, (k, _b) in enumerate(chunks) if k == rec.CH_EVENTS]))
        ev = np.frombuffer(chunks[idx][1], dtype=EVENT_DTYPE).copy()
        rng = random.Random(data.draw(st.integers(0, 2 ** 32)))
        for _ in range(rng.randint(1, 6)):
            field = rng.choice(EVENT_DTYPE.names)
            info = np.iinfo(EVENT_DTYPE[field])
            ev[field][rng.randrange(len(ev))] = rng.choice([info.min, info.max, 0, 1, rng.randint(info.min, info.max)])
        chunks[idx] = (rec.CH_EVENTS, ev.tobytes())
    data_out = bytearray(rec.preamble(blob_header) + b"".join(rec.frame(k, b) for k, b in chunks))
    if target == "bytes":  # raw damage, checksums left as they are: the CRC must catch it
        lo = data.draw(st.sampled_from([0, rec.header_end(bytes(data_out))]))  # the header or the chunks
        for _ in range(data.draw(st.integers(1, 4))):
            data_out[data.draw(st.integers(lo, len(data_out) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = d / "mutated.luo"
    path.write_bytes(bytes(data_out))
    argv = [a.format(a=str(path), good=good, out=str(d / "out")) for a in command]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        code, out, err = _run(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if os.environ.get("FUZZ_LOG"):
        with open(os.environ["FUZZ_LOG"], "a") as f:
            f.write(f"{target} {argv[0]} {code} {err.strip()[:150]!r}\n")
    if code:
        assert code == 1, (argv, code, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("luotrace: error")]
        assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    else:
        assert "Traceback" not in err


def test_a_flipped_bit_in_events_is_reported_and_its_chunk_skipped(parts, tmp_path):
    """The CRC catches what a number cannot: one bit in one record."""
    good, header, chunks, _d = parts
    ev_chunks = [i for i, (k, _b) in enumerate(chunks) if k == rec.CH_EVENTS]
    data = bytearray(open(good, "rb").read())
    kind, pos, start, length = [c for c in rec.walk(bytes(data)) if c[0] == rec.CH_EVENTS][0]
    data[start + 8] ^= 0x10  # a bit of the first record's tgid
    r = rec.parse(bytes(data))
    assert r.damaged == [f"event chunk at byte {pos} ({length // 64} records)"]
    assert r.damaged_records == length // 64
    assert sum(len(c) for c in r.chunks) == sum(len(b) // 64 for k, b in chunks if k == rec.CH_EVENTS) - length // 64
    assert r.maps is not None and r.end is not None  # the rest is read
    p = tmp_path / "flipped.luo"
    p.write_bytes(bytes(data))
    code, out, _err = _run(["report", str(p)])
    assert code == 0 and "damaged part(s) skipped" in out and f"{length // 64} event records not used" in out
    assert len(ev_chunks) >= 1


def test_a_damaged_chunk_length_stops_reading_there(parts):
    good, _header, _chunks, _d = parts
    data = bytearray(open(good, "rb").read())
    kind, pos, start, length = list(rec.walk(bytes(data)))[0]
    data[pos + 4] ^= 0x40  # the length field: the next chunk cannot be found
    r = rec.parse(bytes(data))
    assert r.truncated and "checksum failed" in r.truncated_reason and r.damaged


def test_nan_and_deep_json_are_one_line_errors(parts, tmp_path):
    good, header, chunks, _d = parts
    for bad in (b'{"format": "luotrace.recording", "mode": "folio", "clock": {"base_monotonic_ns": NaN}}',
                b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                json.dumps(dict(header, sample_every=-1)).encode(),
                json.dumps(dict(header, labels={"x": "a\nb"})).encode()):
        p = tmp_path / "bad.luo"
        p.write_bytes(rec.preamble(bad) + b"".join(rec.frame(k, b) for k, b in chunks))
        code, _out, err = _run(["report", str(p)])
        assert code == 1 and err.count("\n") == 1 and "header is corrupt" in err, err


def test_a_map_row_missing_a_field_counts_it_zero_alone_and_joined(parts, tmp_path):
    """The case the fuzzer found: a folio_stats row without one of its fields
    (an older luotrace's recording, or a damaged one).  Alone and joined with
    another boot's recording, the report is built and the field counts 0."""
    good, header, chunks, _d = parts
    idx = max(i for i, (k, _b) in enumerate(chunks) if k == rec.CH_MAPS)
    maps = json.loads(chunks[idx][1])
    for row in maps["folio_stats"]:
        row.pop("array_unread", None)
    chunks = list(chunks)
    chunks[idx] = (rec.CH_MAPS, json.dumps(maps).encode())
    other = json.loads(json.dumps(header))
    other["clock"]["boot_id"] = "00000000-0000-0000-0000-00000000f022"
    p = tmp_path / "old.luo"
    p.write_bytes(rec.preamble(json.dumps(other).encode()) + b"".join(rec.frame(k, b) for k, b in chunks))
    for argv in (["report", "--json", str(p)], ["report", "--json", str(p), good]):
        code, out, err = _run(argv)
        assert code == 0 and "Traceback" not in err, (argv, err)
        files = [f for f in json.loads(out)["files"] if f["handler"] == "guest_memfd"]
        assert files and all(f["folios_preserved"] > 0 for f in files), files
