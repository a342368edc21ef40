"""The exporter, proven against a real Prometheus server (Debian's
`prometheus`, started by the test): it scrapes `luotrace serve` during a
traced model run; the numbers it stores equal the report's; every dashboard
query and recording rule returns data; every name they use is exported."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from dashboards import generate
from exporters.prometheus import (EARLIER_BOOT_BUDGET, SERIES_BUDGET, LuotraceCollector, earlier_boot_families,
                                  exported_series_names, exposition, families)
from tests.conftest import LUOTRACE, REPO
from tracer.probes import catalog
from tracer.analysis.replay import replay

RULES = os.path.join(REPO, "dashboards", "luotrace.rules.yml")
SESSIONS = ["kexec:gmem:4M,memfd:1M", "cancel:gmem:2M", "keep:gmem:1M:hwpoison=10", "keep:gmem:1M:pass_mismatch",
            "discard:gmem:1M"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = pred()
            if v:
                return v
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Prom:
    def __init__(self, base: str):
        self.base = base

    def query(self, expr: str) -> list:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        res = self.query(expr)
        assert len(res) == 1, (expr, res)
        return float(res[0]["value"][1])


@pytest.fixture(scope="module")
def stack(model, gmem, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    lport, pport = free_port(), free_port()
    rec = str(tmp / "run.luo")
    # the update starts 12 s after the probes are attached: Prometheus (5 s
    # interval) has scraped the zero-initialised series by then, as it would
    # have on a host where serve runs before any update
    # --folio-latency: the per-folio latency histogram is among the series checked
    serve = subprocess.Popen(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{lport}", "-o", rec, "--model", model,
                                         "--folio-latency", "--", "sh", "-c", 'sleep 12; exec "$@"', "sh",
                                         model, "--json", str(tmp / "truth.json"), "--pause-ms", "300", *SESSIONS],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cfg = tmp / "prometheus.yml"
    cfg.write_text(f"""
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: luotrace
    static_configs: [{{targets: ["127.0.0.1:{lport}"]}}]
""")
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        p = Prom(f"http://127.0.0.1:{pport}")
        wait_for(lambda: http_get(f"{p.base}/-/ready"), 30, "prometheus ready")
        # the run ends; serve lingers with the final state
        line = ""
        while "serving the final state" not in line:
            line = serve.stderr.readline()
            assert line, "serve exited early: " + serve.stderr.read()
        report = replay(rec) if os.path.exists(rec) else None
        assert report is not None
        want = sum(f["folios_preserved"] or 0 for f in report["files"] if f["handler"] == "guest_memfd")
        q = 'luotrace_folios_preserved_total{handler="guest_memfd"}'
        wait_for(lambda: p.query(q) and float(p.query(q)[0]["value"][1]) == want, 60, "final state scraped")
        time.sleep(11)  # two more scrapes and rule evaluations on the final state
        yield p, report, lport, rec
    finally:
        serve.terminate()
        prom.terminate()
        out, err = serve.communicate(timeout=30)
        prom.communicate(timeout=30)
        assert serve.returncode == 0, err


def test_folio_counter_equals_the_report_exactly(stack):
    p, report, _, _ = stack
    for h in ("guest_memfd", "memfd"):
        want = sum(f["folios_preserved"] or 0 for f in report["files"] if f["handler"] == h)
        assert p.value(f'luotrace_folios_preserved_total{{handler="{h}"}}') == want
    assert want > 0


def test_histogram_count_equals_number_of_preserves(stack):
    p, report, _, _ = stack
    preserves = sum(1 for f in report["files"] if f["preserve"])
    assert preserves == 6
    assert p.value("sum(luotrace_preserve_duration_seconds_count)") == preserves
    errors = p.query("luotrace_preserve_errors_total")
    assert {(r["metric"]["errno"], float(r["value"][1])) for r in errors} == {("EHWPOISON", 1.0), ("EINVAL", 1.0)}
    anomalies = p.query("luotrace_anomalies_total")
    assert [r["metric"]["kind"] for r in anomalies] == ["pass_count_mismatch"]
    folio_count = p.value('luotrace_folio_preserve_duration_seconds_count{handler="guest_memfd"}')
    folio_inf = p.value('luotrace_folio_preserve_duration_seconds_bucket{handler="guest_memfd", le="+Inf"}')
    assert folio_count == folio_inf == p.value('luotrace_folios_preserved_total{handler="guest_memfd"}') + 0  # no errors


def substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*") \
        .replace("$handler", ".*")


def test_every_panel_query_filters_by_instance():
    for expr in generate.queries():
        assert '"$instance"' in expr, expr


def test_every_dashboard_query_returns_data(stack):
    """After one run, at a 5 s scrape interval: the series exist at zero
    before the update, so rate() sees the update itself."""
    p, _, _, _ = stack
    for expr in generate.queries():
        assert p.query(substitute(expr)), expr


def test_preserve_quantiles_have_a_value_for_both_handlers(stack):
    p, _, _, _ = stack
    panels = [e for e in generate.queries() if "histogram_quantile" in e and "luotrace_preserve_duration" in e]
    assert len(panels) >= 2, panels  # p50 and p99
    for expr in panels + ["luotrace:preserve_duration_seconds:p50", "luotrace:preserve_duration_seconds:p99"]:
        # a 5m rate window (Grafana's $__rate_interval on a longer range) however late this test runs
        got = {r["metric"].get("handler"): float(r["value"][1])
               for r in p.query(substitute(expr.replace("$__rate_interval", "5m")))}
        for h in ("guest_memfd", "memfd"):
            assert h in got and 0 < got[h] < 60, (expr, got)  # a latency, not NaN


def test_every_recording_rule_returns_data(stack):
    p, _, _, _ = stack
    names = re.findall(r"record: (\S+)", open(RULES).read())
    assert len(names) == 6
    for n in names:
        assert p.query(n), n


def test_alerts_fire_for_the_errors_and_anomaly_of_the_run(stack):
    p, _, _, _ = stack
    alerts = json.loads(http_get(f"{p.base}/api/v1/alerts"))["data"]["alerts"]
    fired = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
    assert {"LuotracePreserveErrors", "LuotraceAnomaly"} <= fired
    assert "LuotraceLostEvents" not in fired and "LuotraceRequiredProbeMissing" not in fired


def test_names_used_by_dashboards_and_rules_are_exported():
    exported = set(exported_series_names())
    text = generate.render() + open(RULES).read()
    used = set(re.findall(r"\bluotrace_[a-z0-9_]+", text))
    assert used and used <= exported, used - exported
    recorded = set(re.findall(r"record: (\S+)", open(RULES).read()))
    assert set(re.findall(r"\bluotrace:[a-z0-9_:]+", generate.render())) <= recorded


def test_checked_in_dashboard_is_the_generated_one():
    with open(generate.OUT) as f:
        assert f.read() == generate.render()
    d = json.loads(generate.render())
    assert d["schemaVersion"] >= 39
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "instance", "handler"]


def test_exposition_passes_promtool(stack):
    _, _, lport, _ = stack
    text = http_get(f"http://127.0.0.1:{lport}/metrics")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_rules_check_and_unit_tests():
    r = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["promtool", "test", "rules", "rules_test.yml"], capture_output=True, text=True,
                       cwd=os.path.dirname(RULES))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_replay_serves_the_same_numbers(stack, tmp_path):
    p, report, _, rec = stack
    port = free_port()
    s = subprocess.Popen(LUOTRACE + ["serve", "--replay", rec, "--listen", f"127.0.0.1:{port}"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/metrics"), 30, "replay server")
    finally:
        s.terminate()
        s.communicate(timeout=30)
    m = re.search(r'^luotrace_folios_preserved_total\{handler="guest_memfd"\} (\S+)$', text, re.M)
    assert float(m.group(1)) == p.value('luotrace_folios_preserved_total{handler="guest_memfd"}')
    out = tmp_path / "luotrace.prom"
    r = subprocess.run(LUOTRACE + ["export", rec, "--textfile", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert m.group(0) in out.read_text()


def test_port_taken_is_one_line_error(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(LUOTRACE + ["serve", "--listen", f"127.0.0.1:{port}", "--model", model, "--", "true"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "already in use" in r.stderr, r.stderr
    assert "tracing" not in r.stderr  # refused before anything was attached


def _synthetic(n: int) -> dict:
    """A report of N files over both handlers, every result, errnos, anomalies,
    and every probe of the catalog: the collector's input at any scale."""
    probes = [{"symbol": p.symbol, "strategy": "kprobe", "required": p.required, "status": "attached"}
              for p in catalog.probes_for("trace", None)]
    return {"recording": {"mode": "folio", "kernel": "k", "hostname": "h", "labels": {"patch": "v3"}},
            "probes": probes, "update": {"boot_id": "b", "last_kexec_realtime_ns": 1},
            "files": [
        {"handler": "guest_memfd" if i % 3 else "memfd", "inode": i, "size_bytes": 4096 * (i + 1),
         "result": ("ok", "cancelled", "error", "retrieved")[i % 4], "errno": "ENOMEM" if i % 4 == 2 else None,
         "failed_phase": "preserve" if i % 4 == 2 else None,
         "folios_preserved": i, "folios_unpreserved": 0, "folios_restored": 0, "folios_discarded": 0,
         "folios_populated": i, "preserve": {"start_ns": 0, "duration_ns": 1000 + i},
         "phases": [{"name": n, "start_ns": 0, "duration_ns": 10 + i} for n in ("count_pass", "fill_pass")],
         "anomalies": [{"code": "holes", "detail": ""}] if i % 7 == 0 else [],
         "folio_latency_log2_ns": {"10": 5, "12": i}, "folio_preserve_ns_total": 1000 * i}
        for i in range(n)], "sessions": [{"blackout_ns": 1000 + i} for i in range(n // 10)],
        "files_finished": [["guest_memfd", "retrieved", n // 4], ["memfd", "error", n // 4]]}


def _series(rep: dict, per_program: bool = False) -> int:
    return sum(len(f.samples) for f in families(rep, per_program))


def test_series_within_the_budget_at_any_number_of_files():
    """Defaults: at most SERIES_BUDGET series a host, for 64 files as for 10,000."""
    small, big = _series(_synthetic(64)), _series(_synthetic(10_000))
    assert big == small <= SERIES_BUDGET, (small, big)


def test_the_previous_boots_update_adds_at_most_its_budget_and_passes_promtool(tmp_path):
    """An earlier boot's update (serve --state-dir) adds its non-zero
    counters and histograms, each sample labelled with that boot and kernel,
    merged into the live families: a valid exposition, within budget."""
    from prometheus_client import CollectorRegistry, generate_latest
    old = _synthetic(10_000)
    old["update"]["boot_id"], old["recording"]["kernel"] = "b0", "k0"
    extra = earlier_boot_families(old)
    n = sum(len(f.samples) for f in extra)
    assert 0 < n <= EARLIER_BOOT_BUDGET, n
    for f in extra:
        for smp in f.samples:
            assert (smp.labels["boot_id"], smp.labels["kernel"]) == ("b0", "k0"), (f.name, smp)
    assert {f.name for f in extra} >= {"luotrace_folios_preserved", "luotrace_preserve_duration_seconds",
                                       "luotrace_update_info", "luotrace_last_update_timestamp_seconds"}
    assert not {f.name for f in extra} & {"luotrace_files_current", "luotrace_probe_attached", "luotrace_build_info"}
    registry = CollectorRegistry(auto_describe=False)
    LuotraceCollector(lambda: _synthetic(64), registry=registry, earlier=lambda: extra)
    text = generate_latest(registry).decode()
    assert text.count("# TYPE luotrace_folios_preserved_total counter") == 1  # one family per name
    assert 'luotrace_folios_preserved_total{boot_id="b0",handler="memfd",kernel="k0"}' in text
    out = tmp_path / "m.prom"
    out.write_text(text)
    r = subprocess.run(["promtool", "check", "metrics"], stdin=open(out), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert text == generate_latest(registry).decode()  # scraping does not change what is merged in


def test_every_family_exists_at_zero_before_the_first_update():
    """rate() needs a series before the first event: every handler x outcome
    (preserve), handler x phase, handler x final result starts at zero."""
    text = exposition({"recording": {"mode": "folio", "kernel": "k"}, "files": []})
    for h in ("guest_memfd", "memfd"):
        for r in ("ok", "error"):
            assert f'luotrace_preserve_duration_seconds_count{{handler="{h}",result="{r}"}} 0.0' in text
        for r in ("retrieved", "discarded", "cancelled", "rejected", "error"):
            assert f'luotrace_files_total{{handler="{h}",result="{r}"}} 0.0' in text
    for p in ("count_pass", "fill_pass", "luo_freeze", "retrieve", "finish"):
        assert f'luotrace_phase_duration_seconds_count{{handler="guest_memfd",phase="{p}"}} 0.0' in text
    assert 'luotrace_phase_duration_seconds_count{handler="memfd",phase="preserve_folios"} 0.0' in text
    assert "luotrace_blackout_duration_seconds_count 0.0" in text


def test_identity_and_per_program_cost_only_on_request():
    rep = _synthetic(4)
    rep["bpf"] = {"run_time_ns": 3_000_000_000, "run_cnt": 7,
                  "programs": {"a": {"run_time_ns": 1, "run_cnt": 2}, "b": {"run_time_ns": 2, "run_cnt": 5}}}
    text = exposition(rep)
    assert 'luotrace_update_info{boot_id="b",host="h",kernel="k",patch="v3"} 1.0' in text
    assert "luotrace_last_update_timestamp_seconds 1e-09" in text
    assert "luotrace_bpf_runs_total 7.0" in text and "luotrace_bpf_run_time_seconds_total 3.0" in text
    assert _series(rep, per_program=True) == _series(rep) + 2


def test_default_listen_is_localhost(stack):
    """No --listen: bound to 127.0.0.1 only (0100007F in /proc/net/tcp)."""
    _p, _report, _lport, rec = stack
    s = subprocess.Popen(LUOTRACE + ["serve", "--replay", rec], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "serving" in s.stderr.readline(), 30, "replay server")
        with open("/proc/net/tcp") as f:
            listening = [ln.split()[1] for ln in f.readlines()[1:] if ln.split()[3] == "0A"]
        assert f"0100007F:{9477:04X}" in listening  # 127.0.0.1:9477
        assert f"00000000:{9477:04X}" not in listening
    finally:
        s.terminate()
        s.communicate(timeout=30)
