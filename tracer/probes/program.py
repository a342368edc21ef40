"""The BPF C a run compiles, assembled from the catalog: the handler files
in bpf/, the ABI header, and the entry points for each probe's attach type.
The handlers are written once (``NAME_entry_body(args)``,
``NAME_return_body(ret)``); ``wrappers`` generates the entry points for the
attach type chosen.  Text only: loading it is tracer.attach's."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from tracer.kernel import abi
from tracer.kernel import host as kernel
from tracer.probes import catalog
from tracer.probes.catalog import Probe
from tracer.probes.layout import Layout, resolve_layout
from tracer.probes.plan import Options, apply_folio_source, plan, select_handlers

COUNTER_NAMES = abi.COUNTER_NAMES


def bpf_dir() -> str:
    """The BPF sources: tracer/bpf when installed from a wheel (setup.cfg maps
    bpf/ there), else the checkout's bpf/ beside tracer/."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tracer/
    installed = os.path.join(here, "bpf")
    return installed if os.path.isfile(os.path.join(installed, "luotrace.h")) else os.path.join(os.path.dirname(here), "bpf")


def bpf_source(files: List[str]) -> str:
    parts = ["/* ---- generated: tracer/kernel/abi.py ---- */\n" + abi.header()]
    for name in ["luotrace.h"] + files:
        with open(os.path.join(bpf_dir(), name)) as f:
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


def source_files(probes: List[Probe]) -> List[str]:
    """The BPF files of PROBES, in compile order: the core helpers first,
    then each handler's file, then the per-folio and population programs."""
    order = ["lifecycle.c"] + [h.bpf_file for h in catalog.HANDLER_LIST if h.kind == "file"] + \
        ["kho.c", "population.c"]
    used = {p.bpf_file for p in probes}
    if used & set(order[1:]):
        used.add("lifecycle.c")  # the helpers every handler file uses
    return [f for f in order if f in used]


def wrappers(probes: List[Probe], strategy: Dict[str, str], signatures: Dict[str, tuple]) -> str:
    """Entry points for each probe's handler bodies, per attach type:
    kprobe/uprobe programs read struct pt_regs; fentry/fexit programs get the
    arguments as a u64 array and the return value after them."""
    out = ["/* ---- generated entry points (tracer/probes/program.py: wrappers) ---- */"]
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


def final_source(opts: Options) -> str:
    """The BPF text and flags a run with ``opts`` would compile (``--print-bpf``)."""
    layout = resolve_layout(opts.model)
    statuses = select_handlers(plan(opts), opts)
    apply_folio_source(statuses, opts, layout)
    probes = [catalog.BY_NAME[s.name] for s in statuses if s.status == "planned"]
    prog = build_program(opts, layout, probes, {s.name: s.strategy for s in statuses},
                         gmem_dev_flag="<found at start>")
    return "/* cflags: " + " ".join(prog.cflags) + " */\n" + prog.text
