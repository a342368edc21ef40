"""compare on simulated patch iterations: a known 10 % slowdown in one phase
is flagged, and only that phase; runs drawn from the same distribution flag
nothing; the statistics agree with scipy.stats on the same samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from tests.conftest import run_cli
from tracer import compare as cmp
from tracer.simulate import SimSpec, simulate


def make_side(tmp_path, name, seeds, **kw):
    paths = []
    for s in seeds:
        p = str(tmp_path / f"{name}-{s}.luo")
        simulate(SimSpec(**{"files": 8, "size": 64 << 20, "seed": s, "labels": {"patch": name}, **kw}), p)
        paths.append(p)
    return paths


def test_ten_percent_fill_pass_slowdown_is_flagged_alone(tmp_path):
    a = make_side(tmp_path, "v2", range(0, 8))
    b = make_side(tmp_path, "v3", range(100, 108), phase_scale={"fill_pass": 1.10})
    res = cmp.compare(*cmp.load_sides(a + b, "patch"))
    assert res["changed"] == ["guest_memfd/fill_pass"]
    row = next(r for r in res["phases"] if r["phase"] == "fill_pass")
    assert row["verdict"] == "slower" and 0.07 < row["delta"] < 0.13
    assert row["ci_low"] > 0 and row["n_a"] == row["n_b"] == 64 and row["p_holm"] < 0.05
    assert "note" not in row


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_same_distribution_flags_nothing(tmp_path, seed):
    a = make_side(tmp_path, "v2", range(seed * 1000, seed * 1000 + 6))
    b = make_side(tmp_path, "v3", range(seed * 1000 + 500, seed * 1000 + 506))
    res = cmp.compare(*cmp.load_sides(a + b, "patch"), seed=seed)
    assert res["changed"] == [], [(r["phase"], r["p_holm"], r["ci_low"], r["ci_high"]) for r in res["phases"]]


def test_statistics_agree_with_scipy():
    rng = np.random.default_rng(3)
    x = rng.lognormal(10, 0.1, 60)
    y = rng.lognormal(10.05, 0.1, 70)
    lo, hi = cmp.bootstrap_median_delta(x, y, np.random.default_rng(0), n=4000)
    ref = stats.bootstrap((x, y), lambda a, b, axis=-1: np.median(b, axis=axis) - np.median(a, axis=axis),
                          method="percentile", n_resamples=4000, random_state=1, vectorized=True)
    spread = hi - lo
    assert abs(lo - ref.confidence_interval.low) < 0.15 * spread
    assert abs(hi - ref.confidence_interval.high) < 0.15 * spread
    assert cmp.mann_whitney_p(x, y) == pytest.approx(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)


def test_cli_json_and_plot(tmp_path):
    a = make_side(tmp_path, "v2", [1])
    b = make_side(tmp_path, "v3", [2], phase_scale={"fill_pass": 1.5})
    png = tmp_path / "cmp.png"
    r = run_cli("compare", a[0], b[0], "--json", "--plot", str(png), check=True)
    res = json.loads(r.stdout)
    assert res["schema"] == "luotrace.compare/2" and res["changed"] == ["guest_memfd/fill_pass"]
    for key in ("n_a", "n_b", "median_a", "median_b", "delta", "ci_low", "ci_high", "p", "p_holm", "verdict"):
        assert key in res["phases"][0], key
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli("compare", a[0], b[0], a[0])
    assert r.returncode != 0 and "--by" in r.stderr and "Traceback" not in r.stderr


def test_holm_is_step_down_and_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests
    rng = np.random.default_rng(5)
    for _ in range(50):
        p = list(rng.uniform(0, 0.2, rng.integers(1, 12)))
        assert cmp.holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))


def test_four_runs_against_four_say_they_cannot_show_a_change(tmp_path):
    """n = 4/4: the smallest Mann-Whitney p is 2/70 = 0.029, above what Holm
    allows over the phases, so nothing can be called: the row says so, and
    how many runs the effect seen would need."""
    a = make_side(tmp_path, "v2", range(4), files=1)
    b = make_side(tmp_path, "v3", range(50, 54), files=1, phase_scale={"count_pass": 4.8})
    res = cmp.compare(*cmp.load_sides(a + b, "patch"))
    row = next(r for r in res["phases"] if r["phase"] == "count_pass")
    assert row["n_a"] == row["n_b"] == 4 and row["delta"] > 3 and row["verdict"] == "~"
    assert row["p"] == pytest.approx(2 / 70) and row["ci_low"] > 0
    assert "cannot reach significance (smallest p 0.0286" in row["note"] and "samples a side" in row["note"]
    assert "cannot show a change" in cmp.render(res)


def test_a_change_below_the_floor_is_not_called(tmp_path):
    a = make_side(tmp_path, "v2", range(0, 8))
    b = make_side(tmp_path, "v3", range(100, 108), phase_scale={"fill_pass": 1.10})
    res = cmp.compare(*cmp.load_sides(a + b, "patch"), min_change=0.5)
    assert res["changed"] == []
    row = next(r for r in res["phases"] if r["phase"] == "fill_pass")
    assert row["p_holm"] < 0.05 and row["ci_low"] > 0 and row["verdict"] == "~"


def test_unlike_sides_are_warned_about_and_fail_on_change_gates(tmp_path):
    small = str(tmp_path / "small.luo")
    big = str(tmp_path / "big.luo")
    simulate(SimSpec(files=16, size=64 << 20, seed=1), small)
    simulate(SimSpec(files=12, size=1 << 30, seed=2, phase_scale={"fill_pass": 3.0}), big)
    r = run_cli("compare", small, big, "--fail-on-change")
    assert "warning: file sizes differ" in r.stdout and "warning: files per run differ" in r.stdout
    assert r.returncode == 3 and "--fail-on-change" in r.stderr and "fill_pass" in r.stderr


@pytest.mark.parametrize("seed", range(20))
def test_eight_against_eight_finds_a_4x_change_and_only_it(tmp_path, seed):
    """n = 8/8 (one file a run): a 4x count pass is called slower, every
    unchanged phase is not, for 20 seeds."""
    a = make_side(tmp_path, "v2", range(seed * 100, seed * 100 + 8), files=1)
    b = make_side(tmp_path, "v3", range(seed * 100 + 50, seed * 100 + 58), files=1, phase_scale={"count_pass": 4.0})
    res = cmp.compare(*cmp.load_sides(a + b, "patch"), seed=seed)
    assert res["changed"] == ["guest_memfd/count_pass"], [(r["phase"], r["delta"], r["p_holm"])
                                                          for r in res["phases"]]


def test_runs_needed_is_never_below_what_the_family_test_needs(tmp_path):
    """n = 2/2 and a +279 % count pass: the effect is huge, but with the
    phases in one Holm family the test cannot reject below 6 a side; the
    estimate says no fewer."""
    a = make_side(tmp_path, "v2", range(2), files=1)
    b = make_side(tmp_path, "v3", range(50, 52), files=1, phase_scale={"count_pass": 3.79})
    res = cmp.compare(*cmp.load_sides(a + b, "patch"))
    row = next(r for r in res["phases"] if r["phase"] == "count_pass")
    m = sum(1 for r in res["phases"] if not r["total"])
    need = int(row["note"].split("needs about ")[1].split()[0])
    assert need >= cmp.smallest_n(0.05 / m)
    assert cmp.min_p(need, need) * m < 0.05 <= cmp.min_p(need - 1, need - 1) * m or need > cmp.smallest_n(0.05 / m)
    assert cmp.smallest_n(0.05 / 7) == 6 and cmp.smallest_n(0.05) == 4


def test_a_phase_only_one_side_ran_is_listed_not_compared(tmp_path):
    """B's revision dropped the freeze op: its luo_freeze is one-sided, and
    the total row is marked as the total in the JSON."""
    a = make_side(tmp_path, "rfc2", range(4))  # sorted first: side A
    b = make_side(tmp_path, "v4", range(50, 54), freeze_op=False)
    res = cmp.compare(*cmp.load_sides(a + b, "patch"))
    assert res["one_sided"] == [{"handler": "guest_memfd", "phase": "luo_freeze", "side": "A", "n": 32,
                                 "median": res["one_sided"][0]["median"]}]
    assert not any(r["phase"] == "luo_freeze" for r in res["phases"])
    totals = [r for r in res["phases"] if r["total"]]
    assert [(r["handler"], r["phase"]) for r in totals] == [("guest_memfd", "preserve")]
    assert totals[0]["verdict"].startswith("(total) ")
    assert "luo_freeze       A only (n=32" in cmp.render(res)
