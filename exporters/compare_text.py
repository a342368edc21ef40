"""compare's table for a terminal (benchstat-like): what `luotrace compare`
and `luotrace fleet compare` print without --json."""
from __future__ import annotations

from typing import Optional

from exporters.text import fmt_ns
from tracer.base.printable import printable


def _fmt_signed(ns: float) -> str:
    return ("-" if ns < 0 else "") + fmt_ns(int(abs(ns)))


def _pct(sd: Optional[float]) -> str:
    return "-" if sd is None else f"{100 * sd:.1f}%"


def render(res: dict) -> str:
    """A benchstat-like table: medians, delta with its interval, adjusted p,
    and the runs each side had with how they spread."""
    lv = res["levels"]
    lines = [f"A = {res['a']}   B = {res['b']}",
             f"unit: the {lv['unit']}; {lv['runs_a']} run(s) A, {lv['runs_b']} run(s) B (a run is a boot, or a "
             f"recording without one, or a fleet update); calls within a run are not independent samples"]
    lines.append("")
    hdr = f"{'handler':<12} {'phase':<16} {'runs A/B':>9} {'calls':>9} {'median A':>10} {'median B':>10} " \
          f"{'delta':>8} {'95% CI of B-A':>22} {'p (Holm)':>9}  verdict"
    lines += [hdr, "-" * len(hdr)]
    for r in res["phases"]:
        ci = "-" if r["ci_low"] is None else f"[{_fmt_signed(r['ci_low'])}, {_fmt_signed(r['ci_high'])}]"
        delta = f"{100 * r['delta']:+.1f}%" if r["delta"] is not None else "-"
        lines.append(f"{r['handler']:<12} {r['phase']:<16} {str(r['runs_a']) + '/' + str(r['runs_b']):>9} "
                     f"{str(r['n_a']) + '/' + str(r['n_b']):>9} "
                     f"{fmt_ns(int(r['median_a'])):>10} {fmt_ns(int(r['median_b'])):>10} {delta:>8} "
                     f"{ci:>22} {r['p_holm']:9.3g}  {r['verdict']}")
        lines.append(f"{'':<30}spread between runs A {_pct(r['between_run_sd_a'])}, B {_pct(r['between_run_sd_b'])}; "
                     f"within a run A {_pct(r['within_run_sd_a'])}, B {_pct(r['within_run_sd_b'])}")
        if r.get("note"):
            lines.append(f"{'':<30}{r['note']}")
        if r.get("sampled_from"):
            lines.append(f"{'':<30}a sample of {r['sampled_from'][0]}/{r['sampled_from'][1]} calls "
                         "(drawn the same way every run)")
    for r in res.get("one_sided", []):
        lines.append(f"{r['handler']:<12} {r['phase']:<16} {r['side']} only (n={r['n']}, median "
                     f"{fmt_ns(int(r['median']))}): the other side never ran it, not compared")
    for f in res["folio_latency"]:
        lines.append(f"folio latency {f['handler']}: p50 <= {fmt_ns(int(f['p50_a_ns_le'] or 0))} -> "
                     f"{fmt_ns(int(f['p50_b_ns_le'] or 0))}, p99 <= {fmt_ns(int(f['p99_a_ns_le'] or 0))} -> "
                     f"{fmt_ns(int(f['p99_b_ns_le'] or 0))} ({f['n_a']}/{f['n_b']} folios, log2 buckets)")
    lines.append("")
    lines.append(f"{lv['test']}, alpha {res['alpha']}; a change is called only when p (Holm) < alpha, the "
                 f"interval at the family's level (1 - alpha / phases) excludes zero and |delta| >= "
                 f"{100 * res['min_change']:g} %.")
    changed = res["changed"]
    if changed:
        lines.append("changed: " + ", ".join(changed))
    elif any(r.get("note") for r in res["phases"] if r["phase"] != "preserve"):
        lines.append("changed: nothing found, but these runs cannot show a change (see the notes)")
    else:
        lines.append("changed: nothing (no phase passes the test, the interval and the floor)")
    return "\n".join(printable(line) for line in lines) + "\n"
