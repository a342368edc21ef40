"""The built-in default run: real guest_memfds and memfds preserved by the
reference model (one clean session with retrieve after a simulated kexec,
one cancelled with unpreserve, one failing on an injected hwpoisoned folio),
traced live, then the report, checked against the model's own ground truth.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import List, Optional, Tuple

from .errors import LuotraceError
from .loader import Options
from .session import RunResult, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "workloads", "model", "luo_model")
DEFAULT_SESSIONS = ["kexec:gmem:16M,memfd:4M", "cancel:gmem:8M", "kexec:gmem:8M:hwpoison=500"]

COMPARED = ("folios_preserved", "folios_unpreserved", "folios_restored", "folios_discarded", "result", "errno")


def run_model(mode: str, sessions: List[str], output: str, model: str = DEFAULT_MODEL,
              pause_ms: float = 0.0, **kw) -> Tuple[RunResult, dict]:
    """Trace one model run; returns the run and the model's ground truth."""
    if not os.path.exists(model):
        raise LuotraceError(f"reference model {model} not built", "run `make model` (or `make setup`)")
    with tempfile.TemporaryDirectory(prefix="luotrace-") as tmp:
        truth_path = os.path.join(tmp, "truth.json")
        cmd = [model, "--json", truth_path]
        if pause_ms:
            cmd += ["--pause-ms", str(pause_ms)]
        res = run(Options(mode=mode, model=model), output, command=cmd + sessions, **kw)
        if res.command_rc != 0:
            raise LuotraceError(f"the reference model failed (exit {res.command_rc})", "see its message above")
        with open(truth_path) as f:
            truth = json.load(f)
    return res, truth


def compare(report: dict, truth: dict) -> List[str]:
    """Differences between what luotrace saw and what the model did."""
    seen = {f["inode"]: f for f in report["files"]}
    diffs = []
    for t in truth["files"]:
        f = seen.get(t["inode"])
        if f is None:
            diffs.append(f"inode {t['inode']}: not in the report")
            continue
        for k in COMPARED:
            if f.get(k) is None and report["recording"]["mode"] == "light" and k.startswith("folios_"):
                continue  # light mode has no per-folio counters: unknown, not wrong
            if f.get(k) != t[k]:
                diffs.append(f"inode {t['inode']} {k}: luotrace {f.get(k)!r}, model {t[k]!r}")
        if t["handler"] == "guest_memfd" and report["recording"]["mode"] != "light" \
                and f["folios_populated"] != t["folios_populated"]:
            diffs.append(f"inode {t['inode']} folios_populated: luotrace {f['folios_populated']}, "
                         f"model {t['folios_populated']}")
    return diffs


def demo(mode: str = "folio", output: Optional[str] = None) -> Tuple[RunResult, dict, List[str]]:
    out = output or os.path.join(tempfile.gettempdir(), "luotrace-demo.luo")
    res, truth = run_model(mode, DEFAULT_SESSIONS, out, force=output is None)  # the default is the demo's own scratch file
    return res, truth, compare(res.report, truth)
