"""What luotrace writes for machines validates against the JSON Schemas it
publishes (tracer/schemas/): report --json (live, replayed, joined, with
errors and anomalies), compare --json, every line of report --events."""
from __future__ import annotations

import json

from tests.conftest import run_cli
from tracer import schemas
from tracer.live.model import run_model


def test_report_compare_and_events_validate(model, gmem, tmp_path):
    rec = str(tmp_path / "r.luo")
    res, _truth = run_model("folio", ["kexec:gmem:1M,memfd:256K", "keep:gmem:1M:holes=3",
                                      "cancel:gmem:1M:hwpoison=10"], rec, model=model, progress=lambda s: None)
    live = json.loads(json.dumps(res.report))
    assert live["anomalies"] and any(f["errno"] for f in live["files"])
    assert schemas.problem("report", live) is None
    replayed = json.loads(run_cli("report", "--json", rec, check=True).stdout)
    assert schemas.problem("report", replayed) is None
    sim = str(tmp_path / "s.luo")
    run_cli("simulate", "-o", sim, "--files", "8", "--errors", "1", "--anomaly", "pfn_zero", check=True)
    assert schemas.problem("report", json.loads(run_cli("report", "--json", sim, check=True).stdout)) is None
    cmp = json.loads(run_cli("compare", sim, rec, "--json").stdout)
    assert cmp["phases"] and schemas.problem("compare", cmp) is None
    lines = run_cli("report", "--events", rec, check=True).stdout.splitlines()
    assert len(lines) == live["events"]["received"]
    assert {schemas.problem("event", json.loads(x)) for x in lines} == {None}


def test_the_schemas_reject_what_they_should():
    assert schemas.problem("report", {"schema": "luotrace.report/1"}) is not None
    assert schemas.problem("event", {"ts_ns": "soon"}) is not None
    assert schemas.problem("compare", {"schema": "luotrace.compare/1"}) is not None
