"""compare's plot (--plot): one small box plot per phase, both sides, a
diamond per run.  matplotlib is imported when a plot is asked for."""
from __future__ import annotations

import io
import math
import os
from typing import Tuple

import numpy as np

from tracer.analysis.compare import Side, by_run
from tracer.base.errors import LuotraceError
from tracer.base.output import write_output


_UNITS = ((1e9, "s"), (1e6, "ms"), (1e3, "µs"), (1.0, "ns"))


def _unit(values: np.ndarray) -> Tuple[float, str]:
    """The largest unit in which the median reads as at least 1."""
    med = float(np.median(values)) if len(values) else 0.0
    return next(((d, u) for d, u in _UNITS if med >= d), (1.0, "ns"))


def _short(name: str) -> str:
    """A side as a reader knows it: its label (series=seed), or a path's file name."""
    return os.path.basename(name) if os.sep in name else name


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
    names = [_short(a.name), _short(b.name)]
    for ax, k in zip(axes.flat, keys):
        r = rows[k]
        div, unit = _unit(np.concatenate([sa[k], sb[k]]))
        data = [sa[k] / div, sb[k] / div]
        ax.boxplot(data, tick_labels=names, showfliers=False, widths=0.6)
        for i, (side, d) in enumerate(((a, data[0]), (b, data[1])), start=1):
            groups = by_run(d, side.run_of(k))
            # each run its own column, in run order, its calls in time order left to right, its median a mark
            offsets = np.linspace(-0.22, 0.22, len(groups)) if len(groups) > 1 else np.zeros(1)
            for off, g in zip(offsets, groups):
                xs = i + off + np.linspace(-0.03, 0.03, len(g)) if len(g) > 1 else np.full(1, i + off)
                ax.scatter(xs, g, s=5, alpha=0.45, color=("tab:blue", "tab:orange")[i - 1])
                ax.scatter([i + off], [np.median(g)], marker="D", s=22, color="black", zorder=3)
        delta = f"{100 * r['delta']:+.1f} %" if r["delta"] is not None else "-"
        color = {"slower": "tab:red", "faster": "tab:green"}.get(r["verdict"], "black")
        ax.set_title(f"{k[0]} {k[1]} ({r['runs_a']}/{r['runs_b']} runs)\n{delta}  {r['verdict']}", fontsize=9,
                     color=color)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{names[0]} vs {names[1]}: phase durations; a diamond per run (its median), its calls "
                 f"beside it in time order (p Holm < {res['alpha']}, |delta| >= {100 * res['min_change']:g} %)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")  # OUT as given: no ".png" appended to a name without one
    plt.close(fig)
    write_output(out, png.getvalue(), "plot")
