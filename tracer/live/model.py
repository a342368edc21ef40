"""The built-in default run: real guest_memfds (stand-ins where the host's KVM
makes none) and memfds preserved by the reference model (one clean session with retrieve after a simulated kexec,
one cancelled with unpreserve, one failing on an injected hwpoisoned folio),
traced live, then the report, checked against the model's own ground truth.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import tempfile
from typing import List, Optional, Tuple

from tracer.base.errors import LuotraceError
from tracer.probes.plan import Options
from tracer.live.runner import RunResult, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(REPO, "workloads", "model")  # also installed from a wheel (its source)
DEFAULT_MODEL = os.path.join(MODEL_DIR, "luo_model")
MODEL_CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-fno-ipa-icf"]  # as the Makefile builds it


def default_model() -> str:
    """The reference model binary: the checkout's (`make model`), or, where
    luotrace was installed from a wheel, built once from its shipped source
    into ~/.cache/luotrace (gcc is all it takes)."""
    if os.path.exists(DEFAULT_MODEL):
        return DEFAULT_MODEL
    src = os.path.join(MODEL_DIR, "luo_model.c")
    if not os.path.exists(src):
        raise LuotraceError(f"reference model {DEFAULT_MODEL} not built", "run `make model` (or `make setup`)")
    sources = [src] + sorted(glob.glob(os.path.join(MODEL_DIR, "handlers", "*.c")))  # as the Makefile's MODEL_SRCS
    h = hashlib.sha256()
    for part in (*sources, os.path.join(MODEL_DIR, "model.h"), os.path.join(MODEL_DIR, "kvm_abi.h")):
        with open(part, "rb") as f:  # what the binary is built from
            h.update(f.read())
    digest = h.hexdigest()[:12]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "luotrace")
    exe = os.path.join(cache, f"luo_model-{digest}")
    if not os.path.exists(exe):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{exe}.{os.getpid()}"
        try:
            subprocess.run(["gcc", *MODEL_CFLAGS, "-o", tmp, *sources], check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise LuotraceError("the reference model is not built and gcc is missing",
                                "install gcc (build-essential), or pass --model") from None
        except subprocess.CalledProcessError as e:
            raise LuotraceError(f"building the reference model failed: {e.stderr.strip().splitlines()[-1:]}",
                                "build it by hand: gcc -O2 -o luo_model " + " ".join(sources)) from None
        os.replace(tmp, exe)
    return exe
DEFAULT_SESSIONS = ["kexec:gmem:16M,memfd:4M", "cancel:gmem:8M", "kexec:gmem:8M:hwpoison=500"]

COMPARED = ("folios_preserved", "folios_unpreserved", "folios_restored", "folios_discarded", "result", "errno")


def run_model(mode: str, sessions: List[str], output: str, model: Optional[str] = None,
              pause_ms: float = 0.0, population: str = "always", folio_latency: bool = False,
              gmem: Optional[str] = None, **kw) -> Tuple[RunResult, dict]:
    """Trace one model run; returns the run and the model's ground truth.
    GMEM: the backing of its guest_memfd files (tracer/kernel/backing.py choose())."""
    model = model or default_model()
    if not os.path.exists(model):
        raise LuotraceError(f"reference model {model} not built", "run `make model` (or `make setup`)")
    with tempfile.TemporaryDirectory(prefix="luotrace-") as tmp:
        truth_path = os.path.join(tmp, "truth.json")
        cmd = [model, "--json", truth_path]
        if pause_ms:
            cmd += ["--pause-ms", str(pause_ms)]
        res = run(Options(mode=mode, model=model, population=population, folio_latency=folio_latency, gmem=gmem),
                  output, command=cmd + sessions, **kw)
        if res.command_rc != 0:
            raise LuotraceError(f"the reference model failed (exit {res.command_rc})", "see its message above")
        with open(truth_path) as f:
            truth = json.load(f)
    return res, truth


def compare(report: dict, truth: dict) -> List[str]:
    """Differences between what luotrace saw and what the model did."""
    seen = {f["inode"]: f for f in report["files"]}
    diffs = []
    theirs, ours = (truth.get("gmem") or {}).get("backing"), (report.get("gmem") or {}).get("backing")
    if theirs != ours:  # the population probes watched another superblock than the model's files
        diffs.append(f"guest_memfd files: the model's were {theirs}, luotrace watched {ours}")
    for t in truth["files"]:
        f = seen.get(t["inode"])
        if f is None:
            diffs.append(f"inode {t['inode']}: not in the report")
            continue
        for k in COMPARED:
            if f.get(k) is None and report["recording"]["mode"] == "light" and k.startswith("folios_"):
                continue  # light mode has no per-folio counters: unknown, not wrong
            if f.get(k) is None and k in ("folios_preserved", "folios_unpreserved") \
                    and "unwind_incomplete" in f.get("anomalies_not_checked", []):
                continue  # a failed preserve (or its unwind), counted from folio arrays: unknown, and said
            if f.get(k) != t[k]:
                diffs.append(f"inode {t['inode']} {k}: luotrace {f.get(k)!r}, model {t[k]!r}")
        if t["folios_populated"] is not None and report["recording"]["mode"] != "light" \
                and f["folios_populated"] != t["folios_populated"]:
            diffs.append(f"inode {t['inode']} folios_populated: luotrace {f['folios_populated']}, "
                         f"model {t['folios_populated']}")
    return diffs


def demo(mode: str = "folio", output: Optional[str] = None,
         gmem: Optional[str] = None) -> Tuple[RunResult, dict, List[str]]:
    out = output or os.path.join(tempfile.gettempdir(), "luotrace-demo.luo")
    res, truth = run_model(mode, DEFAULT_SESSIONS, out, gmem=gmem,
                           force=output is None)  # the default is the demo's own scratch file
    return res, truth, compare(res.report, truth)
