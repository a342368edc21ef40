"""The retrieve benchmark (`make vmbench-retrieve`): the guest's downtime
path in the new kernel, untraced and traced.

Run inside the lane's guest, once per boot: each boot retrieves what the
boot before kept (a 256 MiB and a 1 GiB guest_memfd, each in a session of
its own with its VM) under one configuration — untraced, `record` in folio
mode (the arrays), `record --folio-latency` (a program per folio) — then
keeps two new ones and kexecs into the next boot.  The configurations are
interleaved (untraced, folio, folio-latency, untraced, ...), REPS of each,
so a drift of the emulation over the run lands on all of them.  When a
configuration traces, the recorder is started and the retrieve waits for
its "tracing" line (readiness, not a sleep); its report keeps the run's BPF
statistics, from which the BPF share of the retrieve is computed.  Traced
configurations use serve's population policy (`--population update`: the
page-cache tracepoints only while a file is in an update, which a retrieve is
not), and once more record's default (`always`), where those tracepoints run
for every folio the retrieve puts back in the page cache.

A boot under TCG now and then dies (an oops while the kernel patches its own
text): the host script boots again, and the retrieve whose files died with
that boot is counted as lost.

    python -m workloads.vm.retrieve_bench OUT KDIR   (inside the guest, each boot)
    python -m workloads.vm.retrieve_bench --summary OUT [OUT...]   (on the host, after; runs together)
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import sys
from typing import Dict, List

PY = sys.executable
CONFIGS = ("untraced", "folio", "folio-latency", "folio-always")
EXTRA = {"folio": ["--population", "update"], "folio-latency": ["--folio-latency", "--population", "update"],
         "folio-always": []}
REPS = int(os.environ.get("LUOTRACE_RB_REPS", "3"))
ORDER = [c for _ in range(REPS) for c in CONFIGS]
SIZES = ("hold:256M", "hold:1G")
# BPF programs on the retrieve path, by configuration (names as bpf_stats gives them)
RETRIEVE_PROGS = {"arrays": ("kho_restore_pages", "kho_restore_vmalloc"), "per folio": ("kho_restore_folio",),
                  "lifecycle": ("kvm_gmem_luo_retrieve",), "page cache": ("mm_filemap_add_to_page_cache",)}


def _stage(out: str) -> int:
    path = os.path.join(out, "rb-stage")
    return int(open(path).read()) if os.path.exists(path) else 0


def boot(out: str, kdir: str) -> None:
    from . import inside, kexec
    from .inside import note_ready, sh, start_recorder
    inside.OUT = out  # sh() logs every command there
    i = _stage(out)
    done = any(os.path.exists(os.path.join(out, f"rb-{what}-{i - 1}{ext}"))
               for what, ext in (("retrieved", ".json"), ("lost", ""), ("failed", ".json")))
    if i > 0 and not done:  # (done: the boot that retrieved them died after; boot again to hold)
        cfg = ORDER[i - 1]
        rec = None
        luo = os.path.join(out, f"rb-{i - 1}.luo")
        if cfg != "untraced":
            # --force: a recording left by a boot that died in its retrieve (this one then finds no files)
            rec = start_recorder(luo, os.path.join(out, f"rb-{i - 1}.log"), handler="guest_memfd",
                                 extra=EXTRA[cfg] + ["--force"])
            note_ready(f"rb-{i - 1}", rec)  # the first start after the kexec: cold
        rc = sh([PY, "-m", "workloads.gmem_luo", "--retrieve", os.path.join(out, f"rb-held-{i - 1}.json"), "--json",
                 os.path.join(out, f"rb-retrieved-{i - 1}.json")])
        if rc:  # this boot is not the kexec that kept them (the one before died): lost
            with open(os.path.join(out, f"rb-lost-{i - 1}"), "w") as f:
                f.write(f"retrieve exit {rc}\n")
            if os.path.exists(os.path.join(out, f"rb-retrieved-{i - 1}.json")):
                os.rename(os.path.join(out, f"rb-retrieved-{i - 1}.json"), os.path.join(out, f"rb-failed-{i - 1}.json"))
        if rec is not None:
            rec.send_signal(signal.SIGINT)
            rec.wait(600)
            sh([PY, "-m", "tracer.cli", "report", "--json", luo], os.path.join(out, f"rb-report-{i - 1}.json"))
    if i >= len(ORDER):
        open(os.path.join(out, "rb-done"), "w").close()
        return
    sh([PY, "-m", "workloads.gmem_luo", "--hold", "--json", os.path.join(out, f"rb-held-{i}.json"), *SIZES])
    with open(os.path.join(out, "rb-stage"), "w") as f:
        f.write(str(i + 1))
    kexec.load(os.path.join(kdir, "bzImage"))
    kexec.execute()
    raise SystemExit("kexec returned")


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def summary(outs: List[str]) -> List[str]:
    """Medians and spread of each file's retrieve per configuration, ratios
    against untraced, and the BPF share of the traced retrieves, over the
    runs in OUTS together."""
    times: Dict[str, Dict[int, List[int]]] = {c: {} for c in CONFIGS}
    bpf: Dict[str, List[float]] = {c: [] for c in CONFIGS}
    parts: Dict[str, Dict[str, List[float]]] = {c: {} for c in CONFIGS}
    runs = lost = 0
    ready: Dict[str, List[float]] = {c: [] for c in CONFIGS}
    for out, (i, cfg) in itertools.product(outs, enumerate(ORDER)):
        noted = os.path.join(out, "ready.json")
        if os.path.exists(noted) and f"rb-{i}" in _load(noted):
            ready[cfg].append(_load(noted)[f"rb-{i}"])
        lost += os.path.exists(os.path.join(out, f"rb-lost-{i}"))
        path = os.path.join(out, f"rb-retrieved-{i}.json")
        if not os.path.exists(path):
            continue
        runs += 1
        got = _load(path)
        total = 0
        for f in got["files"]:
            if f.get("retrieve_ns"):
                times[cfg].setdefault(f["size_bytes"], []).append(f["retrieve_ns"])
                total += f["retrieve_ns"]
        rep_path = os.path.join(out, f"rb-report-{i}.json")
        if cfg != "untraced" and os.path.exists(rep_path):
            progs = _load(rep_path)["bpf"].get("programs", {})
            by = {part: sum(v["run_time_ns"] for k, v in progs.items() if any(k.endswith("__" + p) for p in names))
                  for part, names in RETRIEVE_PROGS.items()}
            if total:
                bpf[cfg].append(sum(by.values()) / total)
                for part, ns in by.items():
                    parts[cfg].setdefault(part, []).append(ns / total)
    rows = [f"retrieve benchmark: {runs} of {len(ORDER) * len(outs)} retrieves ran ({REPS} per configuration, interleaved; "
            f"{lost} lost with a boot that died); medians [min-max]"]
    for size in sorted({s for c in CONFIGS for s in times[c]}):
        base = times["untraced"].get(size)
        if not base:
            continue
        b = statistics.median(base)
        rows.append(f"  {size >> 20} MiB guest_memfd: untraced {b / 1e6:.1f} ms [{min(base) / 1e6:.1f}-{max(base) / 1e6:.1f}]")
        for cfg in CONFIGS[1:]:
            xs = times[cfg].get(size)
            if xs:
                m = statistics.median(xs)
                rows.append(f"    {cfg:<14} {m / 1e6:.1f} ms [{min(xs) / 1e6:.1f}-{max(xs) / 1e6:.1f}]: "
                            f"{m / b:.3f}x" + (" (target: <= 1.03x)" if cfg == "folio" else ""))
    for cfg in CONFIGS[1:]:
        if bpf[cfg]:
            rows.append(f"  BPF share of the retrieves, {cfg}: median {100 * statistics.median(bpf[cfg]):.2f} % "
                        f"[{100 * min(bpf[cfg]):.2f}-{100 * max(bpf[cfg]):.2f}]"
                        + (" (target: <= 1 %)" if cfg == "folio" else "") + ": "
                        + ", ".join(f"{part} {100 * statistics.median(xs):.2f} %" for part, xs in parts[cfg].items()
                                    if statistics.median(xs) > 0))
    starts = [x for c in CONFIGS for x in ready[c]]
    if starts:
        rows.append(f"  time to ready in the new kernel (record's first start after the kexec, cold): median "
                    f"{statistics.median(starts):.2f} s [{min(starts):.2f}-{max(starts):.2f}], n={len(starts)}; "
                    "the retrieve starts on its \"tracing\" line")
    return rows


def main() -> None:
    if sys.argv[1] == "--summary":
        print("\n".join(summary(sys.argv[2:])))
        return
    boot(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
