"""Did v3 of the series make preservation slower, and in which phase?

Groups recordings into two sides (by a label, or one file per side), and per
handler and phase compares the distributions of phase durations: n, median,
p90, p99, relative delta of the medians, a bootstrap 95 % confidence interval
of the median delta and the Mann-Whitney U p-value.  Like benchstat, a change
is claimed only when the interval excludes zero (and p < alpha); otherwise
the verdict is "~" (no change shown).  Per-folio latency is compared from the
in-kernel log2 histograms (slot medians and p99).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .catalog import LEAF_PHASES
from .errors import LuotraceError
from .printable import printable
from .recording import write_output
from .replay import replay

BOOT = 2000
ALPHA = 0.05
MIN_CHANGE = 0.03  # below this relative change of the median nothing is called a change: noise
SCHEMA = "luotrace.compare/2"


@dataclass
class Side:
    """One side of a comparison: phase durations and folio-latency histograms
    per handler, and what makes two sides like for like (kernel, mode, ...).
    Built from reports (`of_reports`) or from the fleet dataset's queries."""
    name: str
    samples: Dict[Tuple[str, str], np.ndarray]  # (handler, phase) -> durations, ns
    folio_hist: Dict[str, np.ndarray]  # handler -> log2 folio-latency buckets
    traits: Dict[str, List[str]]
    # per (handler, phase): samples there were, where only some were used
    sampled_from: Dict[Tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def of_reports(cls, name: str, reports: List[dict]) -> "Side":
        out: Dict[Tuple[str, str], List[int]] = {}
        hist: Dict[str, np.ndarray] = {}
        for rep in reports:
            for f in rep["files"]:
                for p in f["phases"]:
                    if p["name"] in LEAF_PHASES or p["name"] == "preserve":
                        out.setdefault((f["handler"], p["name"]), []).append(p["duration_ns"])
                for slot, c in (f.get("folio_latency_log2_ns") or {}).items():
                    h = hist.setdefault(f["handler"], np.zeros(64, dtype=np.int64))
                    h[int(slot)] += c
        traits = {what: sorted({str(f(r)) for r in reports}) for what, f in TRAITS}
        return cls(name, {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}, hist, traits)


# what makes two sides not like for like, per report
TRAITS = (("kernel", lambda r: r["recording"].get("kernel")), ("mode", lambda r: r["recording"].get("mode")),
          ("file sizes", lambda r: sorted(x.get("size_bytes") or 0 for x in r["files"] if x["result"] != "none")),
          ("files per run", lambda r: sum(1 for x in r["files"] if x["result"] != "none")))


def load_sides(paths: Sequence[str], by: Optional[str]) -> Tuple[Side, Side]:
    reports = [(p, replay(p)) for p in paths]
    if by is None:
        if len(paths) != 2:
            raise LuotraceError(f"{len(paths)} recordings given without --by",
                                "give two recordings, or group many with --by LABEL (e.g. --by patch)")
        return Side.of_reports(paths[0], [reports[0][1]]), Side.of_reports(paths[1], [reports[1][1]])
    groups: Dict[str, List[dict]] = {}
    for p, r in reports:
        val = (r["recording"].get("labels") or {}).get(by)
        if val is None:
            raise LuotraceError(f"{p} has no label '{by}'", f"record with --label {by}=VALUE")
        groups.setdefault(val, []).append(r)
    if len(groups) != 2:
        raise LuotraceError(f"--by {by} gives {len(groups)} groups ({', '.join(sorted(groups)) or 'none'})",
                            "compare exactly two label values")
    (a, ra), (b, rb) = sorted(groups.items())
    return Side.of_reports(f"{by}={a}", ra), Side.of_reports(f"{by}={b}", rb)


def bootstrap_median_delta(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                           n: int = BOOT, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of median(b) - median(a), vectorised a
    block of resamples at a time (memory ~ 16 MiB whatever n; the draws are
    those of one (n, len) call)."""
    def medians(x: np.ndarray) -> np.ndarray:
        step = max(1, (1 << 20) // max(1, len(x)))
        return np.concatenate([np.median(x[rng.integers(0, len(x), size=(min(step, n - i), len(x)))], axis=1)
                               for i in range(0, n, step)])
    ma = medians(a)
    d = medians(b) - ma
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(d, [tail, 100 - tail])
    return float(lo), float(hi)


def mann_whitney_p(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu
    if len(a) < 2 or len(b) < 2:
        return 1.0
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def _hist_quantile(h: np.ndarray, q: float) -> Optional[float]:
    """Upper bound (ns) of the log2 slot holding quantile q."""
    total = h.sum()
    if not total:
        return None
    idx = int(np.searchsorted(np.cumsum(h), q * total))
    return float(2 ** idx)


def holm(pvals: Sequence[float]) -> List[float]:
    """Step-down Holm adjusted p-values: sorted ascending, p_(i) * (m - i + 1),
    made monotone by a running maximum, capped at 1 (statsmodels'
    multipletests(method="holm") gives the same; tests check)."""
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i])
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        adj[i] = running
    return adj


def min_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided Mann-Whitney p that samples of these sizes can
    give (every B above every A): 2 / C(n_a + n_b, n_a), in logs (for a
    fleet's thousands of samples the binomial is past any float)."""
    if not (n_a and n_b):
        return 1.0
    log_c = math.lgamma(n_a + n_b + 1) - math.lgamma(n_a + 1) - math.lgamma(n_b + 1)
    return min(1.0, 2.0 * math.exp(-log_c))


def smallest_n(alpha: float) -> int:
    """The fewest samples a side (equal sides) with which Mann-Whitney can
    give a p below ALPHA at all: no estimate may ask for fewer."""
    n = 1
    while min_p(n, n) >= alpha:
        n += 1
    return n


def runs_needed(x: np.ndarray, y: np.ndarray, alpha: float, power: float = 0.8) -> Optional[int]:
    """Samples a side would need for the effect seen to be found at ALPHA with
    POWER: the normal approximation for a shift of log durations (Cohen's d),
    divided by Mann-Whitney's efficiency 3/pi against the t test, and never
    fewer than the test needs to reject at ALPHA whatever the effect (a huge
    effect on n = 2 a side would otherwise say "about 1")."""
    from scipy.stats import norm
    lx, ly = np.log(np.maximum(x, 1.0)), np.log(np.maximum(y, 1.0))
    sd = math.sqrt((lx.var(ddof=1) * (len(lx) - 1) + ly.var(ddof=1) * (len(ly) - 1)) / (len(lx) + len(ly) - 2)) \
        if len(lx) > 1 and len(ly) > 1 else 0.0
    d = abs(float(ly.mean() - lx.mean())) / sd if sd > 0 else 0.0
    if d == 0.0:
        return None
    n = 2 * (norm.ppf(1 - alpha / 2) + norm.ppf(power)) ** 2 / d ** 2 / (3 / math.pi)
    return max(int(math.ceil(n)), smallest_n(alpha))


def _warnings(a: Side, b: Side) -> List[str]:
    """What makes the two sides not like for like: kernel, mode, sizes, file counts."""
    out = []
    for what in sorted(set(a.traits) & set(b.traits), key=[t for t, _ in TRAITS].index):
        va, vb = a.traits[what], b.traits[what]
        if va != vb:
            out.append(f"{what} differ: A {', '.join(va)[:80]}; B {', '.join(vb)[:80]}")
    return out


def compare(a: Side, b: Side, seed: int = 0, min_change: float = MIN_CHANGE) -> dict:
    """Per handler and phase: n, medians, relative delta, bootstrap CI of the
    median delta, Mann-Whitney p and its step-down Holm adjustment over the
    leaf phases.  A phase is called slower/faster only when the adjusted p
    is below ALPHA, the interval at the family's level (1 - ALPHA / phases,
    ``ci_family``; ``ci_low``/``ci_high`` are the plain 95 % one) excludes
    zero and the change is at least
    MIN_CHANGE; when the sample sizes cannot reach significance at all, the
    row says so, with the runs the effect seen would need."""
    rng = np.random.default_rng(seed)
    sa, sb = a.samples, b.samples
    order = ("preserve",) + LEAF_PHASES
    keys = sorted(set(sa) & set(sb), key=lambda k: (k[0], order.index(k[1])))
    # a phase one side never ran (an op a revision dropped): listed, not compared against nothing
    one_sided = [{"handler": k[0], "phase": k[1], "side": "A" if k in sa else "B", "n": len((sa if k in sa else sb)[k]),
                  "median": float(np.median((sa if k in sa else sb)[k]))}
                 for k in sorted(set(sa) ^ set(sb), key=lambda k: (k[0], order.index(k[1])))]
    leaf = [k for k in keys if k[1] != "preserve"]
    pvals = {k: mann_whitney_p(sa[k], sb[k]) for k in keys}
    adjusted = dict(zip(leaf, holm([pvals[k] for k in leaf])))
    m = max(1, len(leaf))
    rows = []
    for key in keys:
        x, y = sa[key], sb[key]
        ma, mb = float(np.median(x)), float(np.median(y))
        lo, hi = bootstrap_median_delta(x, y, rng)
        # the interval that decides is as wide as the family needs (Bonferroni over the phases):
        # a 95 % interval per phase would exclude zero by chance once in 20 phases
        dlo, dhi = bootstrap_median_delta(x, y, rng, level=1 - ALPHA / m) if key in adjusted else (lo, hi)
        delta = (mb - ma) / ma if ma else None
        p = pvals[key]
        p_holm = adjusted.get(key, p)
        floor = min_p(len(x), len(y)) * (m if key in adjusted else 1)  # Holm's first step is the strictest
        row = {"handler": key[0], "phase": key[1], "n_a": len(x), "n_b": len(y), "median_a": ma, "median_b": mb,
               "delta": delta, "ci_low": lo, "ci_high": hi, "ci_family": [dlo, dhi], "p": p, "p_holm": p_holm,
               "p90_a": float(np.percentile(x, 90)), "p90_b": float(np.percentile(y, 90)),
               "p99_a": float(np.percentile(x, 99)), "p99_b": float(np.percentile(y, 99))}
        big_enough = delta is not None and abs(delta) >= min_change
        if p_holm < ALPHA and dlo > 0 and big_enough:
            verdict = "slower"
        elif p_holm < ALPHA and dhi < 0 and big_enough:
            verdict = "faster"
        else:
            verdict = "~"
        if floor >= ALPHA:
            row["note"] = (f"n={len(x)}/{len(y)} cannot reach significance (smallest p {min_p(len(x), len(y)):.3g}"
                           f"{f' x {m} phases' if key in adjusted else ''} >= {ALPHA})")
            need = runs_needed(x, y, ALPHA / (m if key in adjusted else 1))
            if need is not None and big_enough and delta is not None:
                row["note"] = f"{row['note']}; the {100 * delta:+.0f} % seen needs about {need} samples a side"
        if key in a.sampled_from or key in b.sampled_from:
            row["sampled_from"] = [a.sampled_from.get(key, len(x)), b.sampled_from.get(key, len(y))]
        # preserve encloses the leaf phases: the handler's total, outside the Holm family
        row["total"] = key not in adjusted
        row["verdict"] = "(total) " + verdict if row["total"] else verdict
        rows.append(row)
    folio = []
    ha, hb = a.folio_hist, b.folio_hist
    for h in sorted(set(ha) & set(hb)):
        folio.append({"handler": h, "n_a": int(ha[h].sum()), "n_b": int(hb[h].sum()),
                      "p50_a_ns_le": _hist_quantile(ha[h], 0.5), "p50_b_ns_le": _hist_quantile(hb[h], 0.5),
                      "p99_a_ns_le": _hist_quantile(ha[h], 0.99), "p99_b_ns_le": _hist_quantile(hb[h], 0.99)})
    return {"schema": SCHEMA, "a": a.name, "b": b.name, "alpha": ALPHA, "min_change": min_change,
            "bootstrap": BOOT, "unit": "ns", "phases": rows, "one_sided": one_sided, "folio_latency": folio,
            "warnings": _warnings(a, b),
            "changed": [f"{r['handler']}/{r['phase']}" for r in rows if r["verdict"] in ("slower", "faster")]}


def _fmt_signed(ns: float) -> str:
    from exporters.text import fmt_ns
    return ("-" if ns < 0 else "") + fmt_ns(int(abs(ns)))


def render(res: dict) -> str:
    """A benchstat-like table: medians, delta with its interval, adjusted p."""
    from exporters.text import fmt_ns
    lines = [f"A = {res['a']}   B = {res['b']}"]
    lines += [f"warning: {w}" for w in res.get("warnings", [])]
    lines.append("")
    hdr = f"{'handler':<12} {'phase':<16} {'n A/B':>9} {'median A':>10} {'median B':>10} {'delta':>8} " \
          f"{'95% CI of B-A':>22} {'p (Holm)':>9}  verdict"
    lines += [hdr, "-" * len(hdr)]
    for r in res["phases"]:
        ci = f"[{_fmt_signed(r['ci_low'])}, {_fmt_signed(r['ci_high'])}]"
        delta = f"{100 * r['delta']:+.1f}%" if r["delta"] is not None else "-"
        lines.append(f"{r['handler']:<12} {r['phase']:<16} {str(r['n_a']) + '/' + str(r['n_b']):>9} "
                     f"{fmt_ns(int(r['median_a'])):>10} {fmt_ns(int(r['median_b'])):>10} {delta:>8} "
                     f"{ci:>22} {r['p_holm']:9.3g}  {r['verdict']}")
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
    lines.append(f"Mann-Whitney U, step-down Holm over the phases, alpha {res['alpha']}; bootstrap "
                 f"{res['bootstrap']} resamples; a change is called only when p (Holm) < alpha, the interval "
                 f"at the family's level (1 - alpha / phases) excludes zero and |delta| >= "
                 f"{100 * res['min_change']:g} %.")
    changed = res["changed"]
    if changed:
        lines.append("changed: " + ", ".join(changed))
    elif any(r.get("note") for r in res["phases"] if r["phase"] != "preserve"):
        lines.append("changed: nothing found, but these sample sizes cannot show a change (see the notes)")
    else:
        lines.append("changed: nothing (no phase passes the test, the interval and the floor)")
    return "\n".join(printable(line) for line in lines) + "\n"


_UNITS = ((1e9, "s"), (1e6, "ms"), (1e3, "µs"), (1.0, "ns"))


def _unit(values: np.ndarray) -> Tuple[float, str]:
    """The largest unit in which the median reads as at least 1."""
    med = float(np.median(values)) if len(values) else 0.0
    return next(((d, u) for d, u in _UNITS if med >= d), (1.0, "ns"))


def plot(a: Side, b: Side, out: str, res: dict) -> None:
    """Small multiples, one per phase: both sides by name, every sample as a
    point over its box, the unit chosen per phase, delta and verdict on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sa, sb = a.samples, b.samples
    rows = {(r["handler"], r["phase"]): r for r in res["phases"]}
    keys = [k for k in rows if k in sa and k in sb]
    if not keys:
        raise LuotraceError("no phase is present on both sides", "check the recordings")
    ncol = min(4, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.2 * nrow), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, k in zip(axes.flat, keys):
        r = rows[k]
        div, unit = _unit(np.concatenate([sa[k], sb[k]]))
        data = [sa[k] / div, sb[k] / div]
        ax.boxplot(data, tick_labels=[os.path.basename(a.name), os.path.basename(b.name)], showfliers=False,
                   widths=0.5)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=6, alpha=0.5, color=("tab:blue", "tab:orange")[i - 1])
        delta = f"{100 * r['delta']:+.1f} %" if r["delta"] is not None else "-"
        color = {"slower": "tab:red", "faster": "tab:green"}.get(r["verdict"], "black")
        ax.set_title(f"{k[0]} {k[1]}\n{delta}  {r['verdict']}", fontsize=9, color=color)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{a.name} vs {b.name}: phase durations (p Holm < {res['alpha']}, |delta| >= "
                 f"{100 * res['min_change']:g} %)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")  # OUT as given: no ".png" appended to a name without one
    plt.close(fig)
    write_output(out, png.getvalue(), "plot")
