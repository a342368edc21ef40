"""Generates dashboards/luotrace.json with Grafana's foundation SDK.

    python -m dashboards.generate          # rewrite the checked-in JSON

The panels are declared once in PANELS (title, panel kind, queries, unit);
tests/test_prometheus.py runs every query, variables substituted, against a
real Prometheus scraping luotrace, and fails if the checked-in JSON differs
from what this module generates.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from tracer.probes.catalog import FILE_HANDLERS

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "luotrace.json")
UID = "luotrace-overview"

SEL = 'instance=~"$instance"'
HSEL = 'instance=~"$instance", handler=~"$handler"'
PRESERVE_RATE = f"sum by (le, handler) (rate(luotrace_preserve_duration_seconds_bucket{{{HSEL}}}[$__rate_interval]))"


@dataclass
class PanelSpec:
    title: str
    kind: str  # timeseries | stat | bargauge | table | heatmap
    queries: List[Tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    extra: dict = field(default_factory=dict)


PANELS: List[PanelSpec] = [
    PanelSpec("Preserve latency p50 / p99 by handler", "timeseries", [
        (f"histogram_quantile(0.5, {PRESERVE_RATE})", "p50 {{handler}}"),
        (f"histogram_quantile(0.99, {PRESERVE_RATE})", "p99 {{handler}}"),
    ], unit="s", description="Whole kvm_gmem_luo_preserve / memfd_luo_preserve calls"),
    PanelSpec("Folios preserved per second", "timeseries", [
        (f"sum by (handler) (rate(luotrace_folios_preserved_total{{{HSEL}}}[$__rate_interval]))", "{{handler}}"),
    ], unit="ops", description="Successful kho_preserve_folio calls"),
    PanelSpec("Bytes preserved", "stat", [
        (f"sum by (handler) (luotrace_bytes_preserved_total{{{HSEL}}})", "{{handler}}"),
    ], unit="bytes", width=6),
    PanelSpec("Files finished in range, by result", "stat", [
        (f"sum by (result) (increase(luotrace_files_total{{{HSEL}}}[$__range]))", "{{result}}"),
    ], width=6, description="Files that reached retrieved, discarded, cancelled, rejected or error"),
    PanelSpec("Files now, by state", "stat", [
        (f"sum by (state) (luotrace_files_current{{{HSEL}}})", "{{state}}"),
    ], width=6, description="ok = preserved, waiting for the kexec"),
    PanelSpec("Preservation errors by errno", "bargauge", [
        (f"sum by (handler, errno) (luotrace_preserve_errors_total{{{HSEL}}})", "{{handler}} {{errno}}"),
    ], width=6),
    PanelSpec("Anomalies by kind", "bargauge", [
        (f"sum by (kind) (luotrace_anomalies_total{{{HSEL}}})", "{{kind}}"),
    ], description="Review points of the patch seen on a live run; `luotrace report` gives the evidence", width=6),
    PanelSpec("Blackout (LUO freeze span per session)", "timeseries", [
        (f"luotrace:blackout_duration_seconds:p99{{{SEL}}}", "p99 {{instance}}"),
        (f"luotrace_blackout_duration_seconds_sum{{{SEL}}} / luotrace_blackout_duration_seconds_count{{{SEL}}}",
         "mean {{instance}}"),
    ], unit="s", description="luo_file_freeze spans: the part of the update the guest cannot run"),
    PanelSpec("Time per phase", "bargauge", [
        (f"sum by (phase) (luotrace_phase_duration_seconds_sum{{{HSEL}}})", "{{phase}}"),
    ], unit="s", description="Count pass, fill pass, vmalloc, LUO freeze, unpreserve, retrieve, finish"),
    PanelSpec("kho_preserve_folio latency", "heatmap", [
        (f"sum by (le) (rate(luotrace_folio_preserve_duration_seconds_bucket{{{HSEL}}}[$__rate_interval]))", "{{le}}"),
    ], unit="s", description="From the in-kernel log2 histogram (folio and trace modes)"),
    PanelSpec("Folio latency p99 (recorded)", "timeseries", [
        (f"luotrace:folio_preserve_duration_seconds:p99{{{HSEL}}}", "p99 {{instance}} {{handler}}"),
    ], unit="s"),
    PanelSpec("Events and lost events", "timeseries", [
        (f"rate(luotrace_events_total{{{SEL}}}[$__rate_interval])", "received {{instance}}"),
        (f"increase(luotrace_events_lost_total{{{SEL}}}[$__rate_interval])", "lost {{instance}}"),
    ], description="Lost events are counted in BPF when a ring buffer is full"),
    PanelSpec("Probes attached and strategy", "table", [
        (f"luotrace_probe_attached{{{SEL}}}", ""),
    ], description="1 = attached; strategy kprobe, fentry, uprobe or tracepoint", width=12),
    PanelSpec("Tracer's own CPU cost", "timeseries", [
        (f"luotrace:bpf_cpu_seconds:rate5m{{{SEL}}}", "{{instance}}"),
    ], unit="percentunit", width=6,
        description="Share of one CPU spent in luotrace's BPF programs (BPF_ENABLE_STATS)"),
    PanelSpec("Tracer's BPF program runs", "timeseries", [
        (f"sum by (instance) (rate(luotrace_bpf_runs_total{{{SEL}}}[$__rate_interval]))", "{{instance}}"),
    ], unit="ops", width=6, description="Runs per second of luotrace's BPF programs"),
]


def _datasource():
    from grafana_foundation_sdk.models.common import DataSourceRef
    return DataSourceRef(type_val="prometheus", uid="${datasource}")


def _panel(spec: PanelSpec):
    from grafana_foundation_sdk.builders import bargauge, heatmap, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale

    kinds: Dict[str, Any] = {"timeseries": timeseries.Panel, "stat": stat.Panel, "bargauge": bargauge.Panel,
                             "table": table.Panel, "heatmap": heatmap.Panel}
    p = kinds[spec.kind]().title(spec.title).datasource(_datasource()).span(spec.width).height(spec.height)
    if spec.description:
        p = p.description(spec.description)
    if spec.kind != "table":
        p = p.unit(spec.unit)
    if spec.kind == "heatmap":
        p = p.calculate(False).color(heatmap.HeatmapColorOptions().mode(HeatmapColorMode.SCHEME)
                                     .scheme("Oranges").scale(HeatmapColorScale.EXPONENTIAL).exponent(0.5)
                                     .fill("dark-orange").steps(64).reverse(False))
    for i, (expr, legend) in enumerate(spec.queries):
        q = prometheus.Dataquery().expr(expr).ref_id(chr(ord("A") + i)).datasource(_datasource())
        if legend:
            q = q.legend_format(legend)
        if spec.kind == "heatmap":
            from grafana_foundation_sdk.models.prometheus import PromQueryFormat
            q = q.format(PromQueryFormat.HEATMAP)
        if spec.kind in ("table", "stat", "bargauge"):
            q = q.instant()
        p = p.with_target(q)
    return p


def build() -> dict:
    from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import VariableRefresh

    d = (Dashboard("luotrace: live-update preservation")
         .uid(UID)
         .description("Metrics exported by `luotrace serve` (LUO/KHO preservation: "
                      f"{' and '.join(FILE_HANDLERS)} handlers)")
         .tags(["luotrace", "liveupdate", "kho", "ebpf"])
         .refresh("30s")
         .time("now-1h", "now")
         .timezone("browser")
         .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
         .with_variable(QueryVariable("instance").label("Instance").datasource(_datasource())
                        .query("label_values(luotrace_build_info, instance)")
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                        .all_value(".*"))
         .with_variable(QueryVariable("handler").label("Handler").datasource(_datasource())
                        .query('label_values(luotrace_files_total{instance=~"$instance"}, handler)')
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                        .all_value(".*")))
    for spec in PANELS:
        d = d.with_panel(_panel(spec))
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(d.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def queries() -> List[str]:
    """Every PromQL expression the dashboard runs."""
    return [expr for spec in PANELS for expr, _ in spec.queries]


if __name__ == "__main__":
    with open(OUT, "w") as f:
        f.write(render())
    print(f"wrote {OUT}")
