"""Terminal rendering of the fleet view (tracer/fleet/query.py): the summary's
groups with their errors, anomalies and phase percentiles, and a query's rows."""
from __future__ import annotations

from typing import List, Optional

from exporters.text import fmt_ns
from tracer.base.printable import printable


def _fmt_ns(ns) -> str:
    return "-" if ns is None else fmt_ns(int(round(ns)))


def render_summary(res: dict) -> str:
    """Text: one line per group, then its errors, anomalies and phases."""
    where = f", where {res['where']}" if res.get("where") else ""
    lines = [printable(f"fleet dataset {res['dataset']}, by {res['by']}{where}"), ""]
    hdr = f"{res['by']:<24} {'updates':>8} {'hosts':>6} {'files':>7} {'failed':>7} {'anomalies':>9} " \
          f"{'lost ev':>8} {'cut':>4} {'blackout p50':>13} {'p99':>10}"
    lines += [hdr, "-" * len(hdr)]
    for g in res["groups"]:
        lines.append(f"{printable(g['grp'])[:24]:<24} {g['updates']:>8} {g['hosts']:>6} {g['files']:>7} {g['files_error']:>7} "
                     f"{g['anomalies']:>9} {g['events_lost']:>8} {g['truncated']:>4} "
                     f"{_fmt_ns(g['blackout_p50_ns']):>13} {_fmt_ns(g['blackout_p99_ns']):>10}")
    for g in res["groups"]:
        grp = g["grp"]
        lines += ["", printable(f"{res['by']}={grp}")]
        errs = [e for e in res["errors"] if e["grp"] == grp]
        if errs:
            lines.append("  errors: " + printable(", ".join(f"{e['handler']} {e['errno']} in {e['failed_phase']} x{e['files']}"
                                                            for e in errs)))
        anos = [x for x in res["anomalies"] if x["grp"] == grp]
        if anos:
            lines.append("  anomalies: " + printable(", ".join(f"{x['code']} x{x['anomalies']} ({x['hosts']} hosts)"
                                                               for x in anos)))
        lines.append(f"  {'handler':<12} {'phase':<16} {'n':>8} {'p50':>10} {'p99':>10}")
        for p in (p for p in res["phases"] if p["grp"] == grp):
            lines.append(f"  {printable(p['handler']):<12} {printable(p['phase']):<16} {p['n']:>8} {_fmt_ns(p['p50_ns']):>10} "
                         f"{_fmt_ns(p['p99_ns']):>10}")
    return "\n".join(lines) + "\n"


def render_rows(cols: List[str], rows: List[tuple], limit: Optional[int] = None) -> str:
    """A query's rows as an aligned text table."""
    shown = rows if limit is None else rows[:limit]
    cells = [[("NULL" if v is None else printable(v)) for v in r] for r in shown]
    cols = [printable(c) for c in cols]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    more = len(rows) - len(shown)
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}" + (f", {more} not shown)" if more else ")"))
    return "\n".join(out) + "\n"
