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
        simulate(SimSpec(files=8, size=64 << 20, seed=s, labels={"patch": name}, **kw), p)
        paths.append(p)
    return paths


def test_ten_percent_fill_pass_slowdown_is_flagged_alone(tmp_path):
    a = make_side(tmp_path, "v2", range(0, 8))
    b = make_side(tmp_path, "v3", range(100, 108), phase_scale={"fill_pass": 1.10})
    res = cmp.compare(*cmp.load_sides(a + b, "patch"))
    assert res["changed"] == ["guest_memfd/fill_pass"]
    row = next(r for r in res["phases"] if r["phase"] == "fill_pass")
    assert row["verdict"] == "slower" and 0.07 < row["delta"] < 0.13
    assert row["ci95_ns"][0] > 0 and row["n_a"] == row["n_b"] == 64


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_same_distribution_flags_nothing(tmp_path, seed):
    a = make_side(tmp_path, "v2", range(seed * 1000, seed * 1000 + 6))
    b = make_side(tmp_path, "v3", range(seed * 1000 + 500, seed * 1000 + 506))
    res = cmp.compare(*cmp.load_sides(a + b, "patch"), seed=seed)
    assert res["changed"] == [], [(r["phase"], r["p_value"], r["ci95_ns"]) for r in res["phases"]]


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
    assert res["schema"] == "luotrace.compare/1" and res["changed"] == ["guest_memfd/fill_pass"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli("compare", a[0], b[0], a[0])
    assert r.returncode != 0 and "--by" in r.stderr and "Traceback" not in r.stderr
