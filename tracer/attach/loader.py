"""Compiles the BPF programs for a target, picks an attach strategy per probe
and attaches them, then hands events and map contents to the caller.

Strategy per probe, chosen at run time and reported:
- ``uprobe`` when tracing the reference model (``--model PATH``);
- ``fentry`` (fentry/fexit) on a kernel function in BTF when BPF trampolines
  are supported; if loading them fails, every probe falls back to kprobe and
  the reason is kept;
- ``kprobe`` (kprobe/kretprobe) on a kernel symbol present in /proc/kallsyms;
- ``tracepoint`` for guest_memfd population.
``--strategy kprobe`` forces the fallback.  The handlers in bpf/ are written
once (``NAME_entry_body(args)``, ``NAME_return_body(ret)``); ``wrappers``
generates the entry points for the attach type chosen.
"""
from __future__ import annotations

import ctypes as ct
import mmap
import os
import select
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from tracer.kernel import abi
from tracer.attach import bpf_cache
from tracer.probes import catalog
from tracer.kernel import host as kernel
from tracer.probes.catalog import Probe
from tracer.base.errors import LuotraceError
from tracer.probes.events import EVENT_SIZE
from tracer.probes.layout import Layout, resolve_layout

# The BPF sources: tracer/bpf when installed from a wheel (setup.cfg maps bpf/
# there), else the checkout's bpf/ beside tracer/.
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tracer/
BPF_DIR = os.path.join(_HERE, "bpf")
if not os.path.isfile(os.path.join(BPF_DIR, "luotrace.h")):
    BPF_DIR = os.path.join(os.path.dirname(_HERE), "bpf")

COUNTER_NAMES = abi.COUNTER_NAMES


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
    # The backing of guest_memfd files (tracer/kernel/kvm.py choose()): auto | real |
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


def bpf_source(files: List[str]) -> str:
    parts = ["/* ---- generated: tracer/kernel/abi.py ---- */\n" + abi.header()]
    for name in ["luotrace.h"] + files:
        with open(os.path.join(BPF_DIR, name)) as f:
            parts.append(f"/* ---- {name} ---- */\n" + f.read())
    return "\n".join(parts)


def cflags(opts: Options, layout: Layout, probes: List[Probe]) -> List[str]:
    flags = [f"-D{k}={v}" for k, v in catalog.bpf_defines().items()]
    flags += layout.cflags()
    flags += [f"-DRINGBUF_PAGES={opts.lifecycle_ringbuf_pages}", f"-DFOLIO_RINGBUF_PAGES={opts.folio_ringbuf_pages}",
              f"-DSAMPLE_EVERY={max(1, opts.sample_every)}",
              f"-DMAX_FILES={opts.max_files}", f"-DMAX_INFLIGHT={opts.max_inflight}"]
    if opts.model:
        flags.append("-DLUO_USER=1")
    if opts.mode in ("folio", "trace"):
        flags.append("-DMODE_FOLIO=1")
    if opts.mode == "trace":
        flags.append("-DMODE_TRACE=1")
    if any(p.source == "array" for p in probes):
        flags.append("-DFOLIO_ARRAY=1")
    return flags


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


def source_files(probes: List[Probe]) -> List[str]:
    """The BPF files of PROBES, in compile order: the core helpers first,
    then each handler's file, then the per-folio and population programs."""
    order = ["lifecycle.c"] + [h.bpf_file for h in catalog.HANDLER_LIST if h.kind == "file"] + \
        ["kho.c", "population.c"]
    used = {p.bpf_file for p in probes}
    if used & set(order[1:]):
        used.add("lifecycle.c")  # the helpers every handler file uses
    return [f for f in order if f in used]


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


def wrappers(probes: List[Probe], strategy: Dict[str, str], signatures: Dict[str, tuple]) -> str:
    """Entry points for each probe's handler bodies, per attach type:
    kprobe/uprobe programs read struct pt_regs; fentry/fexit programs get the
    arguments as a u64 array and the return value after them."""
    out = ["/* ---- generated entry points (tracer/attach/loader.py: wrappers) ---- */"]
    for p in probes:
        if p.kind == "tracepoint":
            continue
        if strategy.get(p.name) == "fentry":
            # Arguments are copied out of ctx as plain numbers: the verifier types
            # ctx[i] as BTF pointers, on which the handlers' arithmetic is refused.
            nargs, void = signatures[p.symbol]
            fill = "".join(f" bpf_probe_read_kernel(&a[{i}], 8, &ctx[{i}]);" for i in range(min(nargs, 4)))
            out.append(f"int kfunc__{p.symbol}(u64 *ctx) {{ u64 a[4] = {{}};{fill} return {p.name}_entry_body(a); }}")
            if p.return_fn:
                rc = "" if void else f" bpf_probe_read_kernel(&rc, 8, &ctx[{nargs}]);"
                out.append(f"int kretfunc__{p.symbol}(u64 *ctx) {{ u64 rc = 0;{rc} return {p.name}_return_body(rc); }}")
        else:
            out.append(f"int {p.entry_fn}(struct pt_regs *ctx) {{ u64 a[4] = {{PT_REGS_PARM1(ctx), "
                       f"PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), PT_REGS_PARM4(ctx)}}; "
                       f"return {p.name}_entry_body(a); }}")
            if p.return_fn:
                out.append(f"int {p.return_fn}(struct pt_regs *ctx) {{ return {p.name}_return_body(PT_REGS_RC(ctx)); }}")
    return "\n".join(out) + "\n"


def program_text(probes: List[Probe], strategy: Dict[str, str]) -> str:
    """The BPF C compiled for ``probes``: the handler files and the entry
    points for each probe's attach strategy."""
    return bpf_source(source_files(probes)) + wrappers(probes, strategy, _signatures(probes, strategy))


@dataclass
class Program:
    """What one run compiles: its C text and flags."""
    text: str
    cflags: List[str]


NO_GMEM_DEV = 0xFFFFFFFF  # a population filter that matches no superblock


def build_program(opts: Options, layout: Layout, probes: List[Probe], strategy: Dict[str, str],
                  gmem_dev: Optional[int] = None, gmem_dev_flag: Optional[str] = None) -> Program:
    """The one assembly of a BPF program, used by a run (Tracer), the
    verifier check and --print-bpf, so that what is checked and printed is
    what runs.  GMEM_DEV_FLAG replaces the population filter's value where it
    is not known yet (--print-bpf)."""
    dev = gmem_dev_flag or str(gmem_dev if gmem_dev is not None else NO_GMEM_DEV)
    return Program(program_text(probes, strategy), cflags(opts, layout, probes) + [f"-DGMEM_DEV={dev}"])


def _signatures(probes: List[Probe], strategy: Dict[str, str]) -> Dict[str, tuple]:
    need = [p.symbol for p in probes if strategy.get(p.name) == "fentry"]
    if not need:
        return {}
    btf = kernel.btf()
    return {s: btf.func_signature(s) or (4, False) for s in need}


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


DETACH_THREADS = 2


def detach_all(b, progress: Callable[[str], None] = lambda s: None) -> int:
    """Detach every probe of BCC object B from a pool of threads, saying
    how far it got every second.

    A uprobe's detach waits in the kernel for grace periods (about 0.15 s
    each here); BCC's calls release the GIL, so waits that can overlap do,
    though the kernel serialises most of it (30 uprobes: 4.5 s, against 5.3 s
    one by one).  Two at a time: a process cannot exit before its threads'
    system calls return, so every detach in flight is time a second Ctrl-C
    (quit_now) waits for; with thirty in flight that was 2.8 s.  BCC's own
    cleanup() then finds nothing left but the maps.  Returns how many probes
    were detached."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    jobs = [(b.detach_uprobe_event, k) for k in list(getattr(b, "uprobe_fds", {}))]
    jobs += [(b.detach_kprobe_event, k) for k in list(getattr(b, "kprobe_fds", {}))]
    jobs += [(b.detach_tracepoint, k) for k in list(getattr(b, "tracepoint_fds", {}))]
    jobs += [(b.detach_kfunc, k) for k in list(getattr(b, "kfunc_entry_fds", {}))]
    jobs += [(b.detach_kretfunc, k) for k in list(getattr(b, "kfunc_exit_fds", {}))]
    if len(jobs) < 2:
        return len(jobs)

    def one(job) -> None:
        fn, key = job
        try:
            fn(key)
        except Exception:  # noqa: BLE001 - cleanup() tries again, one by one
            pass

    with ThreadPoolExecutor(max_workers=DETACH_THREADS, thread_name_prefix="luotrace-detach") as pool:
        said = time.monotonic()
        for done, _ in enumerate(as_completed([pool.submit(one, j) for j in jobs]), 1):
            if time.monotonic() - said >= 1.0 and done < len(jobs):
                progress(f"luotrace: detaching: {done}/{len(jobs)} probes")
                said = time.monotonic()
    return len(jobs)


class Tracer:
    """Loaded and attached BPF programs for one run.  Use as a context manager:
    leaving it detaches everything, whatever happened."""

    def __init__(self, opts: Options, layout: Layout, on_bytes: Callable[[bytes], None],
                 before_compile: Callable[[], None] = lambda: None):
        from bcc import BPF  # imported late: doctor and report work without BCC

        _check_ringbuf_pages(opts.lifecycle_ringbuf_pages, "--lifecycle-ringbuf-pages")
        _check_ringbuf_pages(opts.folio_ringbuf_pages, "--folio-ringbuf-pages")
        self.opts = opts
        self.layout = layout
        statuses = select_handlers(plan(opts), opts)
        self.folio_source, self.folio_source_why = apply_folio_source(statuses, opts, layout)
        missing = _required_missing(statuses, opts)
        if missing:
            where = f"model {opts.model}" if opts.model else f"kernel {kernel.release()}"
            raise LuotraceError(f"required probe {missing.symbol} ({missing.handler}) cannot be attached in {where}: "
                                f"{missing.reason or missing.status}",
                                "check `luotrace doctor`; pass --handler to trace fewer handlers")
        self.statuses = statuses
        probes = [catalog.BY_NAME[s.name] for s in statuses if s.status == "planned"]
        if not probes:
            raise LuotraceError("no probe could be attached", "check `luotrace doctor`")
        self.population = any(p.kind == "tracepoint" for p in probes)
        if self.population:
            why = kernel.ensure_tracefs()
            if why:
                raise LuotraceError(f"tracefs is not usable: {why}", "mount debugfs and tracefs (run `make setup`)")
        from tracer.kernel.kvm import choose
        self.backing = choose(opts.gmem)
        self.gmem_dev = self._gmem_dev(statuses) if self.population else None
        self._on_bytes = on_bytes
        self._standby: List[Probe] = []  # population probes attached only during an update
        self._on_demand = False  # "update" policy in force: population counts only cover the windows
        self.population_live = opts.population != "update"
        self.population_windows: List[List[int]] = []  # [on, off] CLOCK_MONOTONIC ns, "update" policy
        self.reused = False  # programs loaded by an earlier start, opened from their pins
        self.cache_note = ""  # kept programs refused or dropped, and why: one line for the user
        self._slot: Optional[bpf_cache.Slot] = None
        before_compile()
        self.bpf = self._compile(BPF, probes)
        try:
            self._fill_layout_maps()
            self._attach(probes)
            self._open_ringbuf()
        except (KeyboardInterrupt, SystemExit):
            self.close()
            raise
        except BaseException as e:
            if not self.reused:
                self.close()
                raise
            # a kept set that verified but does not work: never the run's end
            slot, self._slot = self._slot, None
            self.close()
            self._slot = slot  # still claimed: the fresh compile is kept in it
            if slot is not None:
                slot.drop()
            self.cache_note = f"the programs kept by an earlier start did not work ({type(e).__name__}: " \
                              f"{str(e)[:120]}); dropped and compiled afresh"
            self.reused = False
            self.bpf = self._compile(BPF, probes, reuse=False)  # the slot stays claimed for _keep
            try:
                self._fill_layout_maps()
                self._attach(probes)
                self._open_ringbuf()
            except BaseException:
                self.close()
                raise
        try:
            self._keep()
        except BaseException:
            self.close()
            raise

    def _compile(self, BPF, probes: List[Probe], reuse: bool = True):
        """Compile and load; fentry programs attach while loading, so a kernel
        that refuses them makes every fentry probe fall back to kprobe."""
        prog = build_program(self.opts, self.layout, probes, {s.name: s.strategy for s in self.statuses},
                             self.gmem_dev)
        self.source, self.cflags = prog.text, prog.cflags
        if reuse and bpf_cache.enabled():
            try:
                self._slot = bpf_cache.Slot.claim(bpf_cache.key(self.source, self.cflags))
            except OSError as e:  # tracer.base.private.Unsafe: state that is not root's alone
                self.cache_note = f"programs are not kept between starts: {e}"
                self._slot = None
            adopted = self._slot.adopt(BPF) if self._slot else None
            if self._slot is not None and self._slot.dropped:
                self.cache_note = self._slot.dropped
            if adopted is not None:
                self.reused = True
                return adopted
        try:
            return BPF(text=self.source, cflags=self.cflags)
        except Exception as e:
            fentry = [s for s in self.statuses if s.strategy == "fentry"]
            if not fentry or self.opts.strategy == "fentry" or not kernel.kprobes_enabled():
                raise
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            for s in fentry:
                s.strategy, s.reason = "kprobe", f"fentry failed ({why}); fell back to kprobe"
            prog = build_program(self.opts, self.layout, probes, {s.name: s.strategy for s in self.statuses},
                                 self.gmem_dev)
            self.source = prog.text
            if self._slot is not None:  # the slot was claimed for the fentry text
                self._slot.release()
                self._slot = None
            return BPF(text=self.source, cflags=self.cflags)

    def _keep(self) -> None:
        """After a compile whose every planned probe attached: keep the loaded
        programs for the next start (tracer/attach/bpf_cache.py).  Never fails the run."""
        if self._slot is None or self.reused:
            return
        if any(s.status == "failed" for s in self.statuses):
            return
        try:
            self._slot.keep(self.bpf)
        except OSError:
            self._slot.drop()

    def _fill_layout_maps(self) -> None:
        """Where each handler's ser struct keeps nr_folios, from its folios
        member (the folio-array walk's commit reads it)."""
        if self.folio_source != "array":
            return
        t = self.bpf["fser_nr_delta"]
        for h, (nr, folios) in self.layout.ser.items():
            t[ct.c_int(catalog.HANDLERS[h])] = ct.c_int64(nr - folios)

    def _gmem_dev(self, statuses: List[ProbeStatus]) -> Optional[int]:
        """The dev_t of the superblock the guest_memfd files live on (the
        stand-in ramfs where they are stand-ins), compiled into the
        population filter; found by creating a file there."""
        if self.opts.gmem_dev is not None:
            return self.opts.gmem_dev
        from tracer.kernel.kvm import GmemError, gmem_superblock_dev
        try:
            return gmem_superblock_dev(self.backing)
        except (GmemError, OSError) as e:
            for s in statuses:
                if s.handler == "population" and s.status == "planned":
                    s.status, s.reason = "skipped", f"no guest_memfd superblock: {e}"
            return None

    def _attach(self, probes: List[Probe]) -> None:
        by_name = {s.name: s for s in self.statuses}
        b = self.bpf
        for p in probes:
            st = by_name[p.name]
            if p.kind == "tracepoint":
                if st.status == "planned":
                    st.status = "attached"  # BCC attaches TRACEPOINT_PROBE functions when loading
                    if self.opts.population == "update":
                        b.detach_tracepoint(p.symbol)  # until an update starts: population_on()
                        self._standby.append(p)
                        self._on_demand = True
                else:
                    b.detach_tracepoint(p.symbol)
                continue
            if st.strategy == "fentry":
                st.status = "attached"  # BCC attaches kfunc__/kretfunc__ programs when loading
                continue
            try:
                if st.strategy == "uprobe":
                    b.attach_uprobe(name=self.opts.model, sym=p.symbol, fn_name=p.entry_fn)
                    if p.return_fn:
                        b.attach_uretprobe(name=self.opts.model, sym=p.symbol, fn_name=p.return_fn)
                else:
                    b.attach_kprobe(event=p.symbol, fn_name=p.entry_fn)
                    if p.return_fn:
                        b.attach_kretprobe(event=p.symbol, fn_name=p.return_fn)
                st.status = "attached"
            except Exception as e:  # BCC raises plain Exception
                st.status, st.reason = "failed", str(e).splitlines()[0]
                if p.required:
                    raise LuotraceError(f"attaching {st.strategy} to {p.symbol} failed: {st.reason}",
                                        "check `luotrace doctor`") from None
        if not any(s.status == "attached" for s in self.statuses):
            raise LuotraceError("no probe could be attached", "check `luotrace doctor`")

    @property
    def population_on_demand(self) -> bool:
        """Whether the poll loop attaches and detaches the population
        tracepoints ("update" policy; no longer once an attach failed)."""
        return bool(self._standby)

    def population_on(self) -> bool:
        """Attach the population tracepoints ("update" policy); True if it
        did.  A failure is said by the caller and ends the policy (the run
        goes on without population), never the run."""
        if self.population_live or not self._standby:
            return False
        try:
            for p in self._standby:
                self.bpf.attach_tracepoint(tp=p.symbol, fn_name=p.entry_fn)
        except Exception as e:  # BCC raises plain Exception
            for p in self._standby:
                if p.symbol.encode() in self.bpf.tracepoint_fds:
                    self.bpf.detach_tracepoint(p.symbol)
            self._standby = []
            raise LuotraceError(f"attaching the population tracepoints failed: {str(e).splitlines()[0]}",
                                "population is not traced for the rest of this run") from None
        self.population_live = True
        self.population_windows.append([time.monotonic_ns(), 0])
        return True

    def population_off(self) -> bool:
        """Detach them again once no file is in an update; True if it did."""
        if not self.population_live or not self._standby:
            return False
        for p in self._standby:
            self.bpf.detach_tracepoint(p.symbol)
        self.population_live = False
        self.population_windows[-1][1] = time.monotonic_ns()
        return True

    def _open_ringbuf(self) -> None:
        """Read the ring buffers ourselves (tracer/attach/ringbuf.py), a block at a
        time, and wait on them with epoll: no Python call per event."""
        from tracer.attach.ringbuf import RingReader
        rings = [("events", self.opts.lifecycle_ringbuf_pages)]
        if self.opts.mode == "trace":
            rings.append(("folio_events", self.opts.folio_ringbuf_pages))
        self._rings = [RingReader(self.bpf[name].get_fd(), pages * mmap.PAGESIZE, EVENT_SIZE) for name, pages in rings]
        if self.reused:  # what the last run's programs wrote after its final drain is not this run's
            for r in self._rings:
                r.skip()
        self._epoll: Optional[select.epoll] = select.epoll()
        for r in self._rings:
            self._epoll.register(r.fd, select.EPOLLIN)

    def poll(self, timeout_ms: int = 100) -> None:
        from tracer.attach.ringbuf import wait
        wait(self._epoll, bool(self.drain()), timeout_ms / 1000.0)
        self.drain()

    def drain(self) -> int:
        """Hand every record now in the ring buffers to the consumer; how many bytes."""
        got = 0
        for r in self._rings:
            raw = r.consume()
            if raw:
                got += len(raw)
                self._on_bytes(raw)
        return got

    # ---- maps, read at the end (and by exporters at scrape) ----

    def counters(self) -> Dict[str, int]:
        t = self.bpf["luo_counters"]
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            out[name] = int(sum(t[ct.c_int(i)]))
        return out

    def dump_maps(self) -> dict:
        b = self.bpf
        dump: dict = {"counters": self.counters(), "folio_stats": [], "folio_hist": [], "population": []}
        if self.opts.mode != "light":  # kho.c (per-folio maps) is compiled in folio and trace modes
            try:
                for k, v in b["folio_stats"].items():
                    row = {"ino": k.ino, "dev": k.dev, "handler": k.handler}
                    row.update({f: getattr(v, f) for f, _ in v._fields_})
                    dump["folio_stats"].append(row)
                for k, v in b["folio_preserve_duration_seconds"].items():
                    dump["folio_hist"].append({"ino": k.key.ino, "dev": k.key.dev, "handler": k.key.handler,
                                               "slot": k.slot, "count": v.value})
            except KeyError:
                pass
        if self.population:
            rows: Dict[tuple, dict] = {}

            def add(k, v) -> None:
                key = (k.ino, k.dev, k.handler)
                row = rows.setdefault(key, {"ino": k.ino, "dev": k.dev, "handler": k.handler,
                                            **{f: 0 for f, _ in v._fields_}})
                for f, _ in v._fields_:
                    val = getattr(v, f)
                    row[f] = max(row[f], val) if f == "max_order" else row[f] + val

            for k, v in b["population"].items():
                add(k, v)
            for c in b["pop_cache"][ct.c_int(0)]:  # per-CPU counts not yet folded in
                if c.key.ino or c.key.dev:
                    add(c.key, c.v)
            dump["population"] = [r for r in rows.values() if r["added"] or r["deleted"]]
        dump["population_attached"] = bool(self.population and self.gmem_dev is not None)
        if self.folio_source:
            dump["folio_source"] = self.folio_source
        if self._on_demand:  # also after a failed attach ended it: the counts are still partial
            dump["population_policy"] = "update"
            dump["population_windows"] = [list(w) for w in self.population_windows]
        for key in ("folio_stats", "folio_hist", "population"):
            dump[key].sort(key=lambda r: tuple(r.values()))
        return dump

    def forget(self, keys: List[Tuple[int, int, int]]) -> None:
        """Delete the per-file rows of KEYS (handler, dev, ino) from every BPF
        map that holds them: the files a long-running serve has folded into
        its totals, so that the maps (MAX_FILES entries) never fill."""
        want = set(keys)
        for name in ("folio_stats", "population", "frozen"):
            try:
                t = self.bpf[name]
            except KeyError:
                continue  # not compiled in this mode
            for h, dev, ino in keys:
                k = t.Key(ino=ino, dev=dev, handler=h)
                try:
                    del t[k]
                except KeyError:
                    pass
        try:
            hist = self.bpf["folio_preserve_duration_seconds"]
        except KeyError:
            return
        for k in [k for k in hist.keys() if (k.key.handler, k.key.dev, k.key.ino) in want]:
            try:
                del hist[k]
            except KeyError:
                pass

    def prog_stats(self) -> Dict[str, Dict[str, int]]:
        """Each program's runs and run time in this run (reused programs
        count from their load: what they counted before this run is taken off)."""
        out = {}
        base = getattr(self.bpf, "stats_base", {})
        for name, fn in getattr(self.bpf, "funcs", {}).items():
            n = name.decode() if isinstance(name, bytes) else name
            st = kernel.prog_stats(fn.fd)
            for k in ("run_time_ns", "run_cnt"):
                st[k] -= base.get(name, {}).get(k, 0)
            out[n] = st
        return out

    def close(self, progress: Callable[[str], None] = lambda s: None) -> None:
        for r in getattr(self, "_rings", []):
            r.close()
        self._rings = []
        ep = getattr(self, "_epoll", None)
        if ep is not None:
            ep.close()
            self._epoll = None
        b = getattr(self, "bpf", None)
        if b is not None:
            try:
                detach_all(b, progress)
                b.cleanup()
            finally:
                self.bpf = None
        slot = getattr(self, "_slot", None)
        if slot is not None:
            slot.release()
            self._slot = None

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def verify_kernel_programs(mode: str, layout: Layout) -> Dict[str, str]:
    """Load every kernel-side program of ``mode`` through the real verifier
    without attaching: proves they are valid on this kernel even where the
    traced symbols or CONFIG_KPROBES are absent.  Returns program -> result."""
    from bcc import BPF

    probes = [p for p in catalog.probes_for(mode) if p.kind != "tracepoint"]
    prog = build_program(Options(mode=mode), layout, probes, {})  # {}: kprobe entry points for all
    b = BPF(text=prog.text, cflags=prog.cflags)
    results = {}
    try:
        for p in probes:
            for fn in (p.entry_fn, p.return_fn):
                if fn:
                    b.load_func(fn, BPF.KPROBE)
                    results[fn] = "ok"
    finally:
        b.cleanup()
    return results


def final_source(opts: Options) -> str:
    """The BPF text and flags a run with ``opts`` would compile (``--print-bpf``)."""
    layout = resolve_layout(opts.model)
    statuses = select_handlers(plan(opts), opts)
    apply_folio_source(statuses, opts, layout)
    probes = [catalog.BY_NAME[s.name] for s in statuses if s.status == "planned"]
    prog = build_program(opts, layout, probes, {s.name: s.strategy for s in statuses},
                         gmem_dev_flag="<found at start>")
    return "/* cflags: " + " ".join(prog.cflags) + " */\n" + prog.text
