"""The same guest_memfd scenarios on the reference model (this host, uprobes)
and on the patched kernel (the VM lane's results in OUT), their luotrace
reports side by side: phases, counts, results, errnos, anomalies.

    python -m workloads.vm.model_vs_kernel OUT      # after `make vmtest`
    python -m workloads.vm.model_vs_kernel --ab OUT/latest --model workloads/model/luo_model-latest
                                                     # one side of `make vmtest-ab`

Writes OUT/model-vs-kernel.json ({scenario: {"kernel": view, "model": view,
"differences": [...]}}) and prints a table.  Where the two disagree the
kernel is right: a difference is either fixed in the model or recognised
by EXPLAINED (and docs/lane.md says why); tests/vm_lane.py fails on any other.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Dict, List, Optional

from tracer.live.model import run_model

# kernel scenario (workloads/gmem_luo.py) -> the model session doing the same.
# Single kernel (report-gmem-folio.json): every session is closed at the end,
# so "keep" is a cancel there.  Across the kexec (report-update.json): keep is
# preserved, frozen, retrieved and finished; discard is finished unretrieved.
SINGLE = {"keep": "cancel:gmem:4M,gmem:2M", "cancel": "cancel:gmem:2M", "rejected": "cancel:gmem:1M:private_vm",
          "hwpoison": "keep:gmem:1M:hwpoison=128", "novm": "cancel:gmem:1M:token_enoent"}
ACROSS = {"keep": "kexec:gmem:4M,gmem:2M", "discard": "discard:gmem:1M"}
# The files of `make vmtest` and of one side of `make vmtest-ab`: (tag, report, truth, sessions).
VMTEST = (("single kernel", "report-gmem-folio.json", "truth-gmem-folio.json", SINGLE),
          ("across the kexec", "report-update.json", "held-gmem.json", ACROSS))
AB = (("single kernel", "scenarios-report.json", "scenarios.json", SINGLE),
      ("across the kexec", "update-report.json", "held.json", ACROSS))

# Differences that are the kernel's and stay, each with the test that
# recognises it: (kernel view, model view) -> True when it is that difference.
EXPLAINED = {
    "luo_freeze cut by the jump": (
        "the kernel's LUO freeze runs after kernel_kexec, racing the CPUs being stopped: its luo_freeze "
        "phase is recorded only when the recorder wins (docs/lane.md: the old kernel's end); the model has no "
        "jump and always records it",
        lambda k, m: k == [p for p in m if p != "luo_freeze"] and "luo_freeze" in m),
}
WALK = ("count_pass", "fill_pass")


def view(f: dict) -> dict:
    """What is compared of one file's report entry."""
    names = [p["name"] for p in f["phases"]]
    return {"phases": [n for n in names if n not in WALK], "walk": [n for n in names if n in WALK],
            "result": f["result"], "errno": f["errno"],
            "folios": {k: f[k] for k in ("folios_preserved", "folios_unpreserved", "folios_restored",
                                         "folios_discarded")},
            "anomalies": sorted(a["code"] for a in f["anomalies"])}


def kernel_views(report: dict, truth: dict, scenarios) -> Dict[str, List[dict]]:
    files = {(f["handler"], f["inode"]): f for f in report["files"]}
    out: Dict[str, List[dict]] = {}
    for t in truth["files"]:
        if t["scenario"] in scenarios:
            f = files.get(("guest_memfd", t["inode"]))
            out.setdefault(t["scenario"], []).append(view(f) if f else {"missing": True})
    return out


def model_views(sessions: Dict[str, str], out: str, model: Optional[str] = None) -> Dict[str, List[dict]]:
    names = list(sessions)
    res, truth = run_model("folio", [sessions[n] for n in names], out, model=model)
    files = {f["inode"]: f for f in res.report["files"]}
    views: Dict[str, List[dict]] = {}
    for t in truth["files"]:
        views.setdefault(names[t["session"] - 1], []).append(view(files[t["inode"]]))  # sessions count from 1
    return views


def explain(kernel, model) -> Optional[str]:
    return next((why for why, test in EXPLAINED.values() if test(kernel, model)), None)


def differences(kernel: List[dict], model: List[dict]) -> List[dict]:
    diffs = []
    if len(kernel) != len(model):
        return [{"field": "files", "kernel": len(kernel), "model": len(model), "explained": None}]
    for k, m in zip(kernel, model):
        for field in ("phases", "walk", "result", "errno", "folios", "anomalies"):
            if k.get(field) != m.get(field):
                diffs.append({"field": field, "kernel": k.get(field), "model": m.get(field),
                              "explained": explain(k.get(field), m.get(field))})
    return diffs


def compare(out: str, files=VMTEST, model: Optional[str] = None) -> dict:
    """MODEL: the model binary built as the kernel's revision (luo_model-latest for the latest series)."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="luotrace-mvk-") as tmp:
        for tag, report_name, truth_name, sessions in files:
            paths = [os.path.join(out, n) for n in (report_name, truth_name)]
            if not all(os.path.exists(p) for p in paths):
                continue
            report, truth = (json.load(open(p)) for p in paths)
            kern = kernel_views(report, truth, sessions)
            seen = model_views({s: sessions[s] for s in kern}, os.path.join(tmp, f"{report_name}.luo"), model)
            for s in kern:
                result[f"{tag}: {s}"] = {"kernel": kern[s], "model": seen.get(s, []),
                                         "differences": differences(kern[s], seen.get(s, []))}
    return result


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m workloads.vm.model_vs_kernel", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the directory `make vmtest` wrote (or, with --ab, one side's of `make vmtest-ab`)")
    ap.add_argument("--ab", action="store_true", help="OUT is one side of `make vmtest-ab`")
    ap.add_argument("--model", default=None, help="the model binary of the kernel's revision (default: luo_model)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(args.out):
        ap.error(f"{args.out} is not a directory")
    res = compare(args.out, AB if args.ab else VMTEST, args.model)
    argv = [args.out]
    with open(os.path.join(argv[0], "model-vs-kernel.json"), "w") as f:
        json.dump(res, f, indent=1)
    for name, r in res.items():
        print(f"{name}: {'same' if not r['differences'] else ''}")
        for d in r["differences"]:
            why = d["explained"] or "NOT EXPLAINED"
            print(f"  {d['field']}: kernel {d['kernel']} / model {d['model']}  -- {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
