"""What works on this host, and why not: privileges, BTF, BCC, headers,
tracefs, /dev/kvm, and the strategy every catalog probe would get."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from tracer.kernel import host as kernel
from tracer.probes.catalog import BY_NAME, DROPPED_BY, FILE_HANDLERS, HANDLER_BY_NAME, REVISIONS, revision_of
from tracer.base.errors import LuotraceError
from tracer.probes.plan import Options, ProbeStatus, plan, select_handlers


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    essential: bool = True

    def to_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "essential": self.essential}


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
        from bcc import BPF
        ver = getattr(bcc, "__version__", "?")
        kfunc = BPF.support_kfunc()
        return Check("bcc", True, f"python3-bpfcc {ver} importable; fentry support reported: {'yes' if kfunc else 'no'}")
    except ImportError as e:
        return Check("bcc", False, f"cannot import bcc ({e}): run `make setup` (python3-bpfcc, venv with "
                                   "--system-site-packages from /usr/bin/python3)")


def _btf() -> Check:
    path = kernel.btf_path()
    if not os.path.exists(path):
        return Check("btf", False, f"{path} missing: kernel offsets cannot be resolved (CONFIG_DEBUG_INFO_BTF)")
    from tracer.kernel.btf import BTFError
    try:
        b = kernel.btf()
    except BTFError as e:
        return Check("btf", False, str(e))
    return Check("btf", True, f"{path}: {len(b.structs)} structs, {len(b.functions)} functions")


def _headers() -> Check:
    build = f"/lib/modules/{kernel.release()}/build"
    if os.path.exists(build):
        return Check("headers", True, f"{build} -> {os.path.realpath(build)}")
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return Check("headers", True, "in-kernel headers (/sys/kernel/kheaders.tar.xz)")
    return Check("headers", False, f"{build} missing: run `make setup` to link Debian's linux-headers tree")


def _kvm() -> Check:
    """The capability probe's one line (tracer/kernel/kvm.py), and what follows from it."""
    from tracer.kernel.kvm import probe
    sup = probe()
    if sup.ok:
        return Check("guest_memfd", True, sup.why, essential=False)
    return Check("guest_memfd", False, f"{sup.why}: the model's and the drivers' guest_memfd files will be "
                                       "stand-ins (ramfs page-cache files, said in every output); real ones "
                                       "need /dev/kvm with KVM_CAP_GUEST_MEMFD and MMAP|INIT_SHARED",
                 essential=False)


def run(model: Optional[str] = None) -> List[Check]:
    checks: List[Check] = []
    checks.append(Check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0
                        else "not root: loading BPF needs root (sudo)"))
    checks.append(Check("kernel", True, f"{kernel.release()}", essential=False))
    checks.append(_btf())
    checks.append(_bcc())
    checks.append(_headers())
    why = kernel.ensure_tracefs() if os.geteuid() == 0 else "not root"
    checks.append(Check("tracefs", why is None, "debugfs and tracefs mounted" if why is None else why))
    checks.append(Check("kprobes", kernel.kprobes_enabled(), "kprobe PMU present" if kernel.kprobes_enabled()
                        else "no CONFIG_KPROBES: kernel probes can be verified but not attached", essential=False))
    with kernel.BpfStats() as stats:
        checks.append(Check("bpf_stats", stats.fd is not None, "BPF_ENABLE_STATS works: tracer cost is measured"
                            if stats.fd is not None else "BPF_ENABLE_STATS refused (kernel older than 5.8?): "
                            "no tracer cost figures unless kernel.bpf_stats_enabled is 1", essential=False))
    checks.append(_kvm())
    for target, m in (("kernel", None), ("model", model)):
        if target == "model" and not m:
            continue
        try:
            statuses = plan(Options(mode="trace", model=m))
        except LuotraceError as e:
            checks.append(Check(f"probes ({target})", False, str(e), essential=False))
            continue
        for s in statuses:
            ok = s.status == "planned"
            detail = f"{s.strategy}" if ok else f"{s.status}: {s.reason}"
            dropped = DROPPED_BY.get(s.name)
            req = (f" [required; dropped in {', '.join(dropped)}]" if dropped else " [required]") if s.required else ""
            checks.append(Check(f"{target}: {s.symbol}{req}", ok, detail, essential=False))
        checks += _revisions(target, statuses)
        checks.append(_verdict(target, statuses, m, primary=(target == "model") == bool(model)))
    return checks


def _revisions(target: str, statuses: List[ProbeStatus]) -> List[Check]:
    """Which ops each file handler has here, and the revision of its series
    that looks like (an op a revision dropped is no failure)."""
    present = {s.name for s in statuses if s.status == "planned"}
    out = []
    for h in sorted({r.handler for r in REVISIONS}):
        if HANDLER_BY_NAME[h].preserve not in present:
            continue
        ops = [s for s in statuses if s.handler == h and BY_NAME[s.name].role not in ("walk", "freeze_inode")]
        have = ", ".join(BY_NAME[s.name].role for s in ops if s.name in present)
        lack = ", ".join(BY_NAME[s.name].role for s in ops if s.name not in present)
        rev = revision_of(h, present)
        detail = f"ops here: {have}" + (f"; absent: {lack}" if lack else "")
        detail += f"; looks like revision {rev.name} ({rev.help})" if rev else "; matches no known revision"
        out.append(Check(f"{target}: {h} revision", rev is not None, detail, essential=False))
    return out


def _verdict(target: str, statuses: List[ProbeStatus], model: Optional[str], primary: bool) -> Check:
    """Can `record` trace here (the model with --model, else this kernel)?
    The same selection `record` makes: at least one LUO file handler's
    preserve entry point attachable, with its required probes."""
    try:
        chosen = select_handlers(statuses, Options(mode="trace", model=model))
    except LuotraceError as e:
        return Check(f"verdict ({target})", False, f"luotrace cannot trace this {target}: {e}", essential=primary)
    handlers = sorted({s.handler for s in chosen if s.handler in FILE_HANDLERS})
    return Check(f"verdict ({target})", True, f"luotrace can trace this {target}: {', '.join(handlers)}",
                 essential=primary)


def essential_ok(checks: List[Check]) -> bool:
    return all(c.ok for c in checks if c.essential)
