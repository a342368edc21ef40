"""What each catalog probe gets on this target, decided without loading
anything: the run's options, a status per probe (planned, missing, skipped,
absent and why), the attach strategy and the folio source.

Strategy per probe, chosen at run time and reported:
- ``uprobe`` when tracing the reference model (``--model PATH``);
- ``fentry`` (fentry/fexit) on a kernel function in BTF when BPF trampolines
  are supported; if loading them fails, every probe falls back to kprobe and
  the reason is kept;
- ``kprobe`` (kprobe/kretprobe) on a kernel symbol present in /proc/kallsyms;
- ``tracepoint`` for guest_memfd population.
``--strategy kprobe`` forces the fallback.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Set, Tuple

from tracer.base.errors import LuotraceError
from tracer.kernel import host as kernel
from tracer.probes import catalog
from tracer.probes.layout import Layout


@dataclass
class Options:
    mode: str = "folio"
    model: Optional[str] = None  # path of the reference model: uprobes
    handlers: Optional[List[str]] = None  # subset of catalog.TRACEABLE; None = every handler found
    # lifecycle events: 4 MiB, 65,536 events.  LUO sessions come in bursts
    # (the kernel's 500-file stress test, with every handler asked about every
    # file, overflowed 256 KiB under emulation: 317 events lost).
    lifecycle_ringbuf_pages: int = 1024
    folio_ringbuf_pages: int = 1024  # trace mode's per-folio events: 4 MiB
    sample_every: int = 1
    max_files: int = 4096
    max_inflight: int = 16384
    gmem_dev: Optional[int] = None  # population filter; None = the superblock of the backing's files
    # The backing of guest_memfd files (tracer/kernel/backing.py choose()): auto | real |
    # standin; None = $LUOTRACE_GMEM, else auto.  Commands run under the
    # trace are told the answer through $LUOTRACE_GMEM.
    gmem: Optional[str] = None
    # When the population tracepoints run: "always" (the whole run), or
    # "update" (only while a file is being preserved or waits, preserved, for
    # the kexec; serve's default: a service must cost guests nothing between
    # updates, and any program on those tracepoints costs every fault).
    population: str = "always"
    strategy: str = "auto"  # auto | fentry | kprobe (kernel targets)
    # Folio mode: a program on every kho_preserve_folio (a latency histogram
    # per file, about 3 us a folio under emulation) instead of reading each
    # handler's serialized folio array once per file.
    folio_latency: bool = False


@dataclass
class ProbeStatus:
    name: str
    symbol: str
    handler: str
    required: bool
    strategy: str  # uprobe | kprobe | tracepoint | none
    status: str  # attached | skipped | missing | failed
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def folio_source(opts: Options, layout: Layout, handlers: Set[str]) -> Tuple[str, str]:
    """How folio mode counts the folios of HANDLERS: "array" (each file's
    serialized folio array, read a page at a time inside
    kho_preserve_vmalloc: no program per folio) or "calls" (a program on
    every kho_preserve_folio); with the reason when it is "calls"."""
    if opts.mode == "light":
        return "", ""
    if opts.mode == "trace":
        return "calls", "trace mode streams an event per folio"
    if opts.folio_latency:
        return "calls", "--folio-latency"
    unread = sorted(h for h in handlers if catalog.HANDLER_BY_NAME[h].kind == "file" and h not in layout.ser)
    if unread:
        why = "; ".join(layout.notes.get(f"SER_{h}", f"{h} declares no serialized folio array") for h in unread)
        return "calls", f"no folio array luotrace can read: {why}"
    return "array", ""


def apply_folio_source(statuses: List[ProbeStatus], opts: Options, layout: Layout) -> Tuple[str, str]:
    """Choose the folio source for the handlers in STATUSES and mark the
    other source's probes skipped; "array" falls back to "calls" where its
    probe cannot be attached."""
    source, why = folio_source(opts, layout, {s.handler for s in statuses})
    if source == "array":
        arrays = [s for s in statuses if catalog.BY_NAME[s.name].source == "array"]
        bad = next((s for s in arrays if s.status != "planned"), None)
        if not arrays or bad is not None:
            source, why = "calls", (f"{catalog.BY_NAME[bad.name].symbol} cannot be traced: {bad.reason}" if bad
                                    else "kho_preserve_pages cannot be traced: not planned")
    for s in statuses:
        want = catalog.BY_NAME[s.name].source
        if want and want != source and s.status == "planned":
            s.status = "skipped"
            s.reason = (f"folios counted per call ({why})" if source == "calls" else
                        "folios counted from each file's folio array (--folio-latency: per call)")
    return source, why


def _check_ringbuf_pages(n: int, flag: str) -> None:
    if n < 1 or n & (n - 1):
        raise LuotraceError(f"{flag} {n} is not a power of two", "use e.g. 64, 256 or 1024")


def model_functions(path: str) -> Set[str]:
    """Function symbols of the model binary (what a uprobe can attach to);
    empty for a file that is not an ELF object with a symbol table."""
    from bcc import BPF
    try:
        return {name.decode(errors="replace") for name, _addr in BPF.get_user_functions_and_addresses(path, ".*")}
    except Exception:  # bcc raises plain Exception for unreadable files
        return set()


def plan(opts: Options) -> List[ProbeStatus]:
    """Decide, without loading anything, what each catalog probe would get here."""
    if opts.mode not in catalog.MODES:
        raise LuotraceError(f"unknown mode '{opts.mode}'", f"choose one of {', '.join(catalog.MODES)}")
    if opts.strategy not in STRATEGIES:
        raise LuotraceError(f"unknown strategy '{opts.strategy}'", f"choose one of {', '.join(STRATEGIES)}")
    out: List[ProbeStatus] = []
    funcs = model_functions(opts.model) if opts.model else kernel.kallsyms_functions()
    kprobes = opts.model is None and kernel.kprobes_enabled()
    btf_funcs, fentry_why = (set(), "tracing the model") if opts.model else _fentry_support()
    for p in catalog.probes_for(opts.mode, opts.handlers):
        st = ProbeStatus(p.name, p.symbol, p.handler, p.required, "none", "missing")
        if p.kind == "tracepoint":
            cat, ev = p.tracepoint  # type: ignore[misc]
            if kernel.tracepoint_exists(cat, ev):
                st.strategy, st.status = "tracepoint", "planned"
            else:
                st.reason = f"tracepoint {p.symbol} not found (is tracefs mounted?)"
        elif opts.model:
            if p.symbol in funcs:
                st.strategy, st.status = "uprobe", "planned"
            else:
                st.reason = f"{p.symbol} not in the symbol table of {opts.model}"
        elif p.symbol not in funcs:
            st.reason = f"{p.symbol} not in /proc/kallsyms of {kernel.release()}"
        elif opts.strategy != "kprobe" and not fentry_why and p.symbol in btf_funcs:
            st.strategy, st.status = "fentry", "planned"
        elif opts.strategy == "fentry":
            st.reason = f"fentry forced but unavailable: {fentry_why or f'{p.symbol} not in BTF'}"
        elif not kprobes:
            st.reason = f"kernel built without CONFIG_KPROBES and fentry unavailable ({fentry_why or 'not in BTF'})"
            st.status = "unsupported"
        else:
            st.strategy, st.status = "kprobe", "planned"
        out.append(st)
    return out


STRATEGIES = ("auto", "fentry", "kprobe")


def _fentry_support():
    """(functions in BTF, why fentry cannot be used or '')."""
    try:
        from bcc import BPF
        if not BPF.support_kfunc():
            return set(), "no BPF trampoline support"
    except ImportError:
        return set(), "bcc not importable"
    from tracer.kernel.btf import BTFError
    try:
        return kernel.btf().functions, ""
    except BTFError as e:
        return set(), str(e)


def _required_missing(statuses: List[ProbeStatus], opts: Options) -> Optional[ProbeStatus]:
    """The first required probe that cannot be attached; an op a revision of
    its handler dropped is not required where the code looks like that
    revision (it is marked absent, with the revision, instead)."""
    present = {s.name for s in statuses if s.status in ("planned", "attached")}
    for s in statuses:
        unused = s.status == "skipped" and catalog.BY_NAME[s.name].source  # the other folio source's
        if not s.required or s.status in ("planned", "attached") or unused:
            continue
        rev = catalog.revision_of(s.handler, present)
        if rev is not None and s.name in rev.lacks:
            s.status, s.reason = "absent", f"{s.symbol} is not in the {rev.name} revision of {s.handler}"
            continue
        return s
    return None


def select_handlers(statuses: List[ProbeStatus], opts: Options) -> List[ProbeStatus]:
    """Without --handler, trace every handler whose preserve entry point exists."""
    if opts.handlers is not None:
        return statuses
    present = {s.handler for s in statuses
               if s.name == catalog.HANDLER_BY_NAME[s.handler].preserve and s.status == "planned"}
    if not present:
        preserves = {catalog.HANDLER_BY_NAME[h].preserve for h in catalog.FILE_HANDLERS}
        syms = ", ".join(s.symbol for s in statuses if s.name in preserves)
        where = f"model {opts.model}" if opts.model else f"kernel {kernel.release()}"
        raise LuotraceError(f"no LUO file handler can be traced in {where}: {syms} not found or not attachable",
                            "run on a kernel with CONFIG_LIVEUPDATE (and the guest_memfd LUO patch), "
                            "or trace the reference model with --model workloads/model/luo_model")
    return [s for s in statuses if catalog.handler_kept(s.handler, present)]
