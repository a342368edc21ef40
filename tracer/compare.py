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
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import LuotraceError
from .recording import write_output
from .session import replay

LEAF_PHASES = ("can_preserve", "count_pass", "fill_pass", "preserve_folios", "vmalloc", "luo_freeze",
               "unpreserve", "retrieve", "finish")
BOOT = 2000
ALPHA = 0.05


@dataclass
class Side:
    name: str
    reports: List[dict]

    def samples(self) -> Dict[Tuple[str, str], np.ndarray]:
        out: Dict[Tuple[str, str], List[int]] = {}
        for rep in self.reports:
            for f in rep["files"]:
                for p in f["phases"]:
                    if p["name"] in LEAF_PHASES or p["name"] == "preserve":
                        out.setdefault((f["handler"], p["name"]), []).append(p["duration_ns"])
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    def folio_hist(self) -> Dict[str, np.ndarray]:
        out: Dict[str, np.ndarray] = {}
        for rep in self.reports:
            for f in rep["files"]:
                for slot, c in (f.get("folio_latency_log2_ns") or {}).items():
                    h = out.setdefault(f["handler"], np.zeros(64, dtype=np.int64))
                    h[int(slot)] += c
        return out


def load_sides(paths: Sequence[str], by: Optional[str]) -> Tuple[Side, Side]:
    reports = [(p, replay(p)) for p in paths]
    if by is None:
        if len(paths) != 2:
            raise LuotraceError(f"{len(paths)} recordings given without --by",
                                "give two recordings, or group many with --by LABEL (e.g. --by patch)")
        return Side(paths[0], [reports[0][1]]), Side(paths[1], [reports[1][1]])
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
    return Side(f"{by}={a}", ra), Side(f"{by}={b}", rb)


def bootstrap_median_delta(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                           n: int = BOOT, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of median(b) - median(a), vectorised."""
    ia = rng.integers(0, len(a), size=(n, len(a)))
    ib = rng.integers(0, len(b), size=(n, len(b)))
    d = np.median(b[ib], axis=1) - np.median(a[ia], axis=1)
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


def compare(a: Side, b: Side, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sa, sb = a.samples(), b.samples()
    rows = []
    order = ("preserve",) + LEAF_PHASES
    keys = sorted(set(sa) & set(sb), key=lambda k: (k[0], order.index(k[1])))
    # Holm-Bonferroni over the leaf phases: the family-wise false-claim rate stays <= ALPHA
    leaf = [k for k in keys if k[1] != "preserve"]
    pvals = {k: mann_whitney_p(sa[k], sb[k]) for k in keys}
    m = max(1, len(leaf))
    level: Dict[Tuple[str, str], float] = {}
    for rank, k in enumerate(sorted(leaf, key=lambda k: pvals[k])):
        level[k] = ALPHA / (m - rank)
    for key in keys:
        x, y = sa[key], sb[key]
        ma, mb = float(np.median(x)), float(np.median(y))
        lo, hi = bootstrap_median_delta(x, y, rng)
        p = pvals[key]
        a_k = level.get(key, ALPHA)
        clo, chi = bootstrap_median_delta(x, y, rng, level=1 - a_k) if key in level else (lo, hi)
        if key[1] == "preserve":
            verdict = "(total)"
        elif clo > 0 and p < a_k:
            verdict = "slower"
        elif chi < 0 and p < a_k:
            verdict = "faster"
        else:
            verdict = "~"
        rows.append({"handler": key[0], "phase": key[1], "n_a": len(x), "n_b": len(y),
                     "median_a_ns": ma, "median_b_ns": mb,
                     "p90_a_ns": float(np.percentile(x, 90)), "p90_b_ns": float(np.percentile(y, 90)),
                     "p99_a_ns": float(np.percentile(x, 99)), "p99_b_ns": float(np.percentile(y, 99)),
                     "delta": (mb - ma) / ma if ma else None, "ci95_ns": [lo, hi], "p_value": p,
                     "verdict": verdict})
    folio = []
    ha, hb = a.folio_hist(), b.folio_hist()
    for h in sorted(set(ha) & set(hb)):
        folio.append({"handler": h, "n_a": int(ha[h].sum()), "n_b": int(hb[h].sum()),
                      "p50_a_ns_le": _hist_quantile(ha[h], 0.5), "p50_b_ns_le": _hist_quantile(hb[h], 0.5),
                      "p99_a_ns_le": _hist_quantile(ha[h], 0.99), "p99_b_ns_le": _hist_quantile(hb[h], 0.99)})
    return {"schema": "luotrace.compare/1", "a": a.name, "b": b.name, "alpha": ALPHA, "bootstrap": BOOT,
            "phases": rows, "folio_latency": folio,
            "changed": [f"{r['handler']}/{r['phase']}" for r in rows if r["verdict"] in ("slower", "faster")]}


def render(res: dict) -> str:
    from exporters.text import fmt_ns
    lines = [f"A = {res['a']}   B = {res['b']}   (bootstrap 95 % CI of the median delta, Mann-Whitney U)", ""]
    hdr = f"{'handler':<12} {'phase':<16} {'n':>7} {'median A':>10} {'median B':>10} {'delta':>8} " \
          f"{'95% CI':>22} {'p':>8}  verdict"
    lines += [hdr, "-" * len(hdr)]
    for r in res["phases"]:
        ci = f"[{fmt_ns(int(r['ci95_ns'][0])) if r['ci95_ns'][0] >= 0 else '-' + fmt_ns(int(-r['ci95_ns'][0]))}, " \
             f"{fmt_ns(int(r['ci95_ns'][1])) if r['ci95_ns'][1] >= 0 else '-' + fmt_ns(int(-r['ci95_ns'][1]))}]"
        delta = f"{100 * r['delta']:+.1f}%" if r["delta"] is not None else "-"
        lines.append(f"{r['handler']:<12} {r['phase']:<16} {str(r['n_a']) + '/' + str(r['n_b']):>7} "
                     f"{fmt_ns(int(r['median_a_ns'])):>10} {fmt_ns(int(r['median_b_ns'])):>10} {delta:>8} "
                     f"{ci:>22} {r['p_value']:8.3g}  {r['verdict']}")
    for f in res["folio_latency"]:
        lines.append(f"folio latency {f['handler']}: p50 <= {fmt_ns(int(f['p50_a_ns_le'] or 0))} -> "
                     f"{fmt_ns(int(f['p50_b_ns_le'] or 0))}, p99 <= {fmt_ns(int(f['p99_a_ns_le'] or 0))} -> "
                     f"{fmt_ns(int(f['p99_b_ns_le'] or 0))} ({f['n_a']}/{f['n_b']} folios, log2 buckets)")
    lines.append("")
    lines.append("changed: " + (", ".join(res["changed"]) if res["changed"] else "nothing (no interval excludes zero)"))
    return "\n".join(lines) + "\n"


def plot(a: Side, b: Side, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sa, sb = a.samples(), b.samples()
    keys = [k for k in sorted(set(sa) & set(sb), key=lambda k: (k[0], LEAF_PHASES.index(k[1])
                                                                if k[1] in LEAF_PHASES else -1))
            if k[1] != "preserve"]
    if not keys:
        raise LuotraceError("no phase is present on both sides", "check the recordings")
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.boxplot([sa[k] / 1e3, sb[k] / 1e3], tick_labels=["A", "B"], showfliers=False)
        ax.set_title(f"{k[0]}\n{k[1]}", fontsize=9)
        ax.set_ylabel("µs")
    fig.suptitle(f"A = {a.name}   B = {b.name}", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")  # OUT as given: no ".png" appended to a name without one
    plt.close(fig)
    write_output(out, png.getvalue(), "plot")
