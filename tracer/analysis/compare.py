"""Did v3 of the series make preservation slower, and in which phase?

Groups recordings into two sides (by a label, or one file per side), and per
handler and phase compares the phase durations: n, median, p90, p99,
relative delta of the medians, a 95 % confidence interval of the median
delta and a p-value.  Like benchstat, a change is claimed only when the
interval excludes zero (and p < alpha); otherwise the verdict is "~".
Per-folio latency is compared from the in-kernel log2 histograms.

The unit is the run, not the call (Kalibera and Jones, "Rigorous
Benchmarking in Reasonable Time", ISMM 2013).  Whatever makes one boot
slower than another (where memory landed, host load, the order of the runs)
moves every call inside it together, so calls of one boot are not
independent samples of a revision.  Each sample carries its run (the boot
id where the recording has one, else the recording; in the fleet, the
update).  The test is Student's t on the runs' log medians, the interval a
two-level bootstrap (runs, then calls within them), and the variance between
runs and within them is shown.  With one run a side nothing is called: the
row says how small the spread between boots would have to be for the delta
seen to matter, and how many runs a side would settle it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tracer.probes.catalog import LEAF_PHASES
from tracer.base.errors import LuotraceError
from tracer.analysis.replay import replay

ALPHA = 0.05
MIN_CHANGE = 0.03  # below this relative change of the median nothing is called a change: noise
SCHEMA = "luotrace.compare/3"
# a run drifts: |Spearman rho| of duration against call order >= DRIFT_RHO over >= DRIFT_MIN calls,
# at a p below DRIFT_ALPHA shared (Bonferroni) by every run and phase checked
DRIFT_RHO, DRIFT_ALPHA, DRIFT_MIN = 0.8, 0.05, 6


@dataclass
class Side:
    """One side of a comparison: phase durations and folio-latency histograms
    per handler, the run each duration came from, and what makes two sides
    like for like (kernel, mode, ...).  Built from reports (`of_reports`)
    or from the fleet dataset's queries."""
    name: str
    samples: Dict[Tuple[str, str], np.ndarray]  # (handler, phase) -> durations, ns, in time order within each run
    folio_hist: Dict[str, np.ndarray]  # handler -> log2 folio-latency buckets
    traits: Dict[str, List[str]]
    # per (handler, phase): samples there were, where only some were used
    sampled_from: Dict[Tuple[str, str], int] = field(default_factory=dict)
    # per (handler, phase): the run (an index into run_names) of each sample
    runs: Dict[Tuple[str, str], np.ndarray] = field(default_factory=dict)
    run_names: List[str] = field(default_factory=list)

    @classmethod
    def of_reports(cls, name: str, reports: List[dict], run_ids: Optional[List[str]] = None) -> "Side":
        """REPORTS, each a run named by RUN_IDS (a boot id; the same id twice
        is one run), in the order given."""
        run_ids = run_ids or [f"run {i + 1}" for i in range(len(reports))]
        names: List[str] = []
        out: Dict[Tuple[str, str], List[Tuple[int, int, float]]] = {}
        hist: Dict[str, np.ndarray] = {}
        for rep, rid in zip(reports, run_ids):
            if rid not in names:
                names.append(rid)
            run = names.index(rid)
            for f in rep["files"]:
                for p in f["phases"]:
                    if p["name"] in LEAF_PHASES or p["name"] == "preserve":
                        out.setdefault((f["handler"], p["name"]), []).append((run, p["start_ns"], p["duration_ns"]))
                for slot, c in (f.get("folio_latency_log2_ns") or {}).items():
                    h = hist.setdefault(f["handler"], np.zeros(64, dtype=np.int64))
                    h[int(slot)] += c
        traits = {what: sorted({str(f(r)) for r in reports}) for what, f in TRAITS}
        for v in out.values():
            v.sort(key=lambda x: (x[0], x[1]))
        return cls(name, {k: np.asarray([d for _r, _t, d in v], dtype=np.float64) for k, v in out.items()}, hist,
                   traits, runs={k: np.asarray([r for r, _t, _d in v], dtype=np.int64) for k, v in out.items()},
                   run_names=names)

    def run_of(self, key: Tuple[str, str]) -> np.ndarray:
        """The run of each sample of KEY (all one run where none was given)."""
        r = self.runs.get(key)
        return r if r is not None else np.zeros(len(self.samples[key]), dtype=np.int64)


# what makes two sides not like for like, per report
TRAITS = (("kernel", lambda r: r["recording"].get("kernel")), ("mode", lambda r: r["recording"].get("mode")),
          ("file sizes", lambda r: sorted(x.get("size_bytes") or 0 for x in r["files"] if x["result"] != "none")),
          ("files per run", lambda r: sum(1 for x in r["files"] if x["result"] != "none")))


def _run_id(path: str) -> str:
    """The run a recording belongs to: its boot (two recordings of one boot
    are one run), else the recording itself."""
    from tracer.recording.format import read
    boot = (read(path).header.get("clock") or {}).get("boot_id")
    return f"boot {boot[:8]}" if boot else os.path.basename(path)


def load_sides(paths: Sequence[str], by: Optional[str]) -> Tuple[Side, Side]:
    reports = [(p, replay(p), _run_id(p)) for p in paths]
    if by is None:
        if len(paths) != 2:
            raise LuotraceError(f"{len(paths)} recordings given without --by",
                                "give two recordings, or group many with --by LABEL (e.g. --by patch)")
        return tuple(Side.of_reports(p, [r], [rid]) for p, r, rid in reports)  # type: ignore[return-value]
    groups: Dict[str, List[Tuple[dict, str]]] = {}
    for p, r, rid in reports:
        val = (r["recording"].get("labels") or {}).get(by)
        if val is None:
            raise LuotraceError(f"{p} has no label '{by}'", f"record with --label {by}=VALUE")
        groups.setdefault(val, []).append((r, rid))
    if len(groups) != 2:
        raise LuotraceError(f"--by {by} gives {len(groups)} groups ({', '.join(sorted(groups)) or 'none'})",
                            "compare exactly two label values")
    (a, ra), (b, rb) = sorted(groups.items())
    return (Side.of_reports(f"{by}={a}", [r for r, _ in ra], [i for _, i in ra]),
            Side.of_reports(f"{by}={b}", [r for r, _ in rb], [i for _, i in rb]))


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


def _warnings(a: Side, b: Side) -> List[str]:
    """What makes the two sides not like for like: kernel, mode, sizes, file counts."""
    out = []
    for what in sorted(set(a.traits) & set(b.traits), key=[t for t, _ in TRAITS].index):
        va, vb = a.traits[what], b.traits[what]
        if va != vb:
            out.append(f"{what} differ: A {', '.join(va)[:80]}; B {', '.join(vb)[:80]}")
    return out


def by_run(x: np.ndarray, runs: np.ndarray) -> List[np.ndarray]:
    """X's samples, one array per run, in run order (time order kept)."""
    return [x[runs == r] for r in np.unique(runs)]


def levels(groups: List[np.ndarray]) -> dict:
    """How the variance of log durations splits between runs and within
    them (one-way random effects, method of moments): each as an sd of the
    log, which reads as a relative spread (0.05 ~ 5 %).  None where a level
    cannot be estimated (one run; one call a run)."""
    logs = [np.log(np.maximum(g, 1.0)) for g in groups]
    n = sum(len(g) for g in logs)
    k = len(logs)
    within = sum(float(((g - g.mean()) ** 2).sum()) for g in logs) / (n - k) if n > k else None
    between = None
    if k > 1:
        means = np.array([g.mean() for g in logs])
        per_run = k / sum(1.0 / len(g) for g in logs)  # harmonic mean of calls a run
        between = max(0.0, float(means.var(ddof=1)) - (within or 0.0) / per_run)
    return {"runs": k, "between_run_sd": None if between is None else math.sqrt(between),
            "within_run_sd": None if within is None else math.sqrt(within)}


def run_test(ga: List[np.ndarray], gb: List[np.ndarray]) -> Tuple[float, int, float, float]:
    """Student's t on the runs' log medians: (p, degrees of freedom, mean log
    ratio B/A, its standard error).  No degree of freedom (one run a side):
    p 1, nothing can be said.

    The variance of a run's median is at least what its own calls' spread
    gives it (pi/2 x the within-run variance / calls, for a median): with
    three runs a side, their medians can agree by chance far better than
    that, and an A/A then calls a change (it did, in the lane); the spread
    within runs, estimated from every call, bounds it from below."""
    la = np.log(np.maximum([np.median(g) for g in ga], 1.0))
    lb = np.log(np.maximum([np.median(g) for g in gb], 1.0))
    df = len(la) + len(lb) - 2
    diff = float(lb.mean() - la.mean())
    if df < 1:
        return 1.0, df, diff, math.inf
    pooled = ((la.var(ddof=1) * (len(la) - 1) if len(la) > 1 else 0.0) +
              (lb.var(ddof=1) * (len(lb) - 1) if len(lb) > 1 else 0.0)) / df
    within = levels(list(ga) + list(gb))["within_run_sd"]
    if within is not None:
        calls = len(ga + gb) / sum(1.0 / len(g) for g in list(ga) + list(gb))  # harmonic mean of calls a run
        pooled = max(pooled, math.pi / 2 * within ** 2 / calls)
    se = math.sqrt(pooled * (1 / len(la) + 1 / len(lb)))
    if se == 0.0:
        return (1.0 if diff == 0.0 else 0.0), df, diff, 0.0
    from scipy.stats import t as student
    return float(2 * student.sf(abs(diff) / se, df)), df, diff, se


def runs_needed_sd(sd: float, diff: float, alpha: float, power: float = 0.8) -> Optional[int]:
    """Runs a side for a log ratio DIFF to be found at ALPHA with POWER when
    runs spread by SD (log): the normal approximation, never below 2."""
    from scipy.stats import norm
    if not diff or sd <= 0:
        return None
    return max(2, int(math.ceil(2 * (norm.ppf(1 - alpha / 2) + norm.ppf(power)) ** 2 * sd ** 2 / diff ** 2)))


def drift(sides: Sequence[Tuple[Side, str]]) -> List[str]:
    """Runs whose calls of a phase trend with time (a disturbance inside the
    boot, or a warm-up), by a stated rule: |Spearman rho| of duration against
    call order >= DRIFT_RHO over at least DRIFT_MIN calls, at p < DRIFT_ALPHA
    divided by the runs and phases checked (so that steady runs, checked
    by the dozen, are not named by chance)."""
    from scipy.stats import spearmanr
    checked = []
    for side, label in sides:
        for key, x in sorted(side.samples.items()):
            runs = side.run_of(key)
            for r in np.unique(runs):
                g = x[runs == r]
                if len(g) >= DRIFT_MIN and not np.all(g == g[0]):
                    rho, p = spearmanr(np.arange(len(g)), g)
                    name = side.run_names[r] if r < len(side.run_names) else f"run {r + 1}"
                    checked.append((label, name, key, len(g), float(rho), float(p)))
    out = []
    for label, name, key, n, rho, p in checked:
        if abs(rho) >= DRIFT_RHO and p < DRIFT_ALPHA / len(checked):
            out.append(f"{label} {name}: {key[0]} {key[1]} drifts over the run (Spearman rho {rho:+.2f} over "
                       f"{n} calls in time order): a disturbance inside that boot, not a revision's doing")
    return out


def compare(a: Side, b: Side, min_change: float = MIN_CHANGE,
            noise: Optional[Dict[Tuple[str, str], float]] = None) -> dict:
    """Per handler and phase: n (calls and runs), medians, relative delta,
    the variance between runs and within them, and the test on runs: a
    phase is called slower/faster only when the Holm-adjusted p (over the
    leaf phases) is below ALPHA, the interval at the family's level
    (1 - ALPHA / phases, ``ci_family``; ``ci_low``/``ci_high`` are the plain
    95 % one) excludes zero and the change is at least MIN_CHANGE.  With one
    run a side nothing is called.  NOISE: the spread between runs per phase
    (sd of the log) an A/A measured, used where the sides cannot tell it."""
    from scipy.stats import t as student
    sa, sb = a.samples, b.samples
    order = ("preserve",) + LEAF_PHASES
    keys = sorted(set(sa) & set(sb), key=lambda k: (k[0], order.index(k[1])))
    # a phase one side never ran (an op a revision dropped): listed, not compared against nothing
    one_sided = [{"handler": k[0], "phase": k[1], "side": "A" if k in sa else "B", "n": len((sa if k in sa else sb)[k]),
                  "median": float(np.median((sa if k in sa else sb)[k]))}
                 for k in sorted(set(sa) ^ set(sb), key=lambda k: (k[0], order.index(k[1])))]
    leaf = [k for k in keys if k[1] != "preserve"]
    groups = {k: (by_run(sa[k], a.run_of(k)), by_run(sb[k], b.run_of(k))) for k in keys}
    tests = {k: run_test(*groups[k]) for k in keys}
    adjusted = dict(zip(leaf, holm([tests[k][0] for k in leaf])))
    m = max(1, len(leaf))
    rows = []
    for key in keys:
        x, y = sa[key], sb[key]
        ga, gb = groups[key]
        ma, mb = float(np.median(x)), float(np.median(y))
        p, df, diff, se = tests[key]
        fam = key in adjusted
        delta = (mb - ma) / ma if ma else None
        p_holm = adjusted.get(key, p)
        la, lb = levels(ga), levels(gb)
        row = {"handler": key[0], "phase": key[1], "n_a": len(x), "n_b": len(y), "runs_a": len(ga), "runs_b": len(gb),
               "median_a": ma, "median_b": mb, "delta": delta, "p": p, "p_holm": p_holm,
               "between_run_sd_a": la["between_run_sd"], "between_run_sd_b": lb["between_run_sd"],
               "within_run_sd_a": la["within_run_sd"], "within_run_sd_b": lb["within_run_sd"],
               "p90_a": float(np.percentile(x, 90)), "p90_b": float(np.percentile(y, 90)),
               "p99_a": float(np.percentile(x, 99)), "p99_b": float(np.percentile(y, 99))}
        if df >= 1:
            # the interval of the run-level log ratio, as a delta of A's median in ns
            half, half_fam = (float(student.ppf(1 - q / 2, df)) * se for q in (ALPHA, ALPHA / m if fam else ALPHA))
            lo, hi = (ma * (math.exp(diff + s * half) - 1) for s in (-1, 1))
            dlo, dhi = (ma * (math.exp(diff + s * half_fam) - 1) for s in (-1, 1))
            row.update(ci_low=lo, ci_high=hi, ci_family=[dlo, dhi])
        else:
            row.update(ci_low=None, ci_high=None, ci_family=None)
            dlo = dhi = 0.0
        big_enough = delta is not None and abs(delta) >= min_change
        if df >= 1 and p_holm < ALPHA and dlo > 0 and big_enough:
            verdict = "slower"
        elif df >= 1 and p_holm < ALPHA and dhi < 0 and big_enough:
            verdict = "faster"
        else:
            verdict = "~"
        known = (noise or {}).get(key)
        level = ALPHA / (m if fam else 1)
        if df < 1:
            from scipy.stats import norm
            matters = abs(diff) / (norm.ppf(1 - level / 2) * math.sqrt(2))
            note = (f"one run a side: a difference between two single runs cannot be told from a difference "
                    f"between boots; the {100 * (delta or 0):+.1f} % seen matters only if boots spread by less "
                    f"than {100 * matters:.1f} % (sd)")
            need = runs_needed_sd(known, diff, level) if known else None
            row["note"] = note + (f"; boots spread {100 * (known or 0):.1f} % (the A/A given): about {need} runs a "
                                  f"side would settle it" if need else
                                  "; run an A/A, or several boots a side, to know how much they spread")
        elif verdict == "~" and big_enough and delta is not None:
            sd = math.sqrt(se ** 2 / (1 / len(ga) + 1 / len(gb))) if math.isfinite(se) else 0.0
            need = runs_needed_sd(sd, diff, level)
            if need is not None and need > min(len(ga), len(gb)):
                row["note"] = (f"the {100 * delta:+.1f} % seen needs about {need} runs a side (runs spread "
                               f"{100 * sd:.1f} %)")
        if key in a.sampled_from or key in b.sampled_from:
            row["sampled_from"] = [a.sampled_from.get(key, len(x)), b.sampled_from.get(key, len(y))]
        # preserve encloses the leaf phases: the handler's total, outside the Holm family
        row["total"] = not fam
        row["verdict"] = "(total) " + verdict if row["total"] else verdict
        rows.append(row)
    folio = []
    ha, hb = a.folio_hist, b.folio_hist
    for h in sorted(set(ha) & set(hb)):
        folio.append({"handler": h, "n_a": int(ha[h].sum()), "n_b": int(hb[h].sum()),
                      "p50_a_ns_le": _hist_quantile(ha[h], 0.5), "p50_b_ns_le": _hist_quantile(hb[h], 0.5),
                      "p99_a_ns_le": _hist_quantile(ha[h], 0.99), "p99_b_ns_le": _hist_quantile(hb[h], 0.99)})
    runs_a = len(a.run_names) or 1
    runs_b = len(b.run_names) or 1
    unit = "run" if runs_a + runs_b > 2 else "run (one a side: nothing can be called)"
    drifts = drift([(a, "A"), (b, "B")])
    return {"schema": SCHEMA, "a": a.name, "b": b.name, "alpha": ALPHA, "min_change": min_change,
            "unit": "ns",
            "levels": {"unit": unit, "runs_a": runs_a, "runs_b": runs_b, "run_names_a": a.run_names,
                       "run_names_b": b.run_names,
                       "test": "Student's t on the runs' log medians, step-down Holm over the leaf phases"},
            "phases": rows, "one_sided": one_sided, "folio_latency": folio,
            "warnings": _warnings(a, b) + drifts, "drift": drifts,
            "changed": [f"{r['handler']}/{r['phase']}" for r in rows if r["verdict"] in ("slower", "faster")]}


def noise_of(res: dict) -> Dict[Tuple[str, str], float]:
    """The spread between runs per phase an A/A compare measured (its JSON):
    the larger of the two sides' estimates, the noise floor an A/B is read
    against."""
    out = {}
    for r in res.get("phases", []):
        sds = [v for v in (r.get("between_run_sd_a"), r.get("between_run_sd_b")) if v is not None]
        if sds:
            out[(r["handler"], r["phase"])] = max(sds)
    return out


