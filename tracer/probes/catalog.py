"""The probe catalog: every probe point luotrace knows, declared once.

The loader reads it to decide what to compile and attach, the decoder to name
event fields, the aggregator to know what a probe means (its role), ``doctor``
and the probe table of docs/developers.md to explain it.  Adding a probe point is one entry
here plus its handler in ``bpf/`` (functions ``<name>_entry`` / ``<name>_return``,
or a ``TRACEPOINT_PROBE``); ``tests/test_catalog.py`` checks the two agree.

Probe ids are positions in PROBES and are stored in recordings: append new
probes at the end.

Sources of the kernel signatures: the guest_memfd LUO patch
(virt/kvm/guest_memfd_luo.c, v1), mm/memfd_luo.c, kernel/liveupdate/ (Linux 7.2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

MODES = ("light", "folio", "trace")


@dataclass(frozen=True)
class Handler:
    """Something luotrace traces as a unit, declared once: the loader's
    selection, the aggregator's file test and walk phases, the exporter's
    series, the docs and the handler table of docs/developers.md all derive from it.

    ``kind``: ``file`` (a LUO file handler: its files are followed and
    reported), ``core`` (KHO, LUO: traced with any file handler),
    ``population`` (comes with the file handler named by ``follows``), or
    ``none`` (the id of "no handler").  ``preserve``: the probe whose presence
    says the handler exists in the traced code.  ``walk``: the phase names of
    its folio walk probe's pass 1 and pass 2 (``walk_probe``).  ``phases``:
    every phase a file of it can show, in order (the exporter initialises a
    series per phase).  ``bpf_file``: its probes' BPF, under bpf/.
    ``walk_counts_on_error``: its walk's out count is set even when the walk
    fails (memfd_luo_preserve_folios sets it only on success).  ``ser``: the
    structs of the serialized folio array it hands to kho_preserve_vmalloc
    (``<ser>.folios``, ``<ser>.nr_folios``, an array of ``<folio_ser>``
    {pfn:52, flags:12, index}): folio mode counts its folios by walking
    that array once per file instead of a program on every
    kho_preserve_folio; a handler without one is counted per call."""

    name: str
    id: int  # as in BPF map keys (struct fkey.handler) and events: stored in recordings
    kind: str
    preserve: Optional[str] = None
    walk_probe: Optional[str] = None
    walk: Tuple[str, str] = ("", "")
    phases: Tuple[str, ...] = ()
    fs_magic: Tuple[int, ...] = ()  # superblock magics of its kind of file (include/uapi/linux/magic.h)
    follows: Optional[str] = None
    bpf_file: str = "lifecycle.c"
    walk_counts_on_error: bool = True
    ser: Tuple[str, str] = ("", "")  # (ser struct, folio ser struct) in kernel BTF
    help: str = ""


# LUO asks every handler about every file, and a file no handler takes is
# shown as rejected by the handler whose kind it is (FS magic).  memfd: tmpfs,
# and hugetlbfs for MFD_HUGETLB memfds (which memfd_luo refuses).
HANDLER_LIST: Tuple[Handler, ...] = (
    Handler("none", 0, "none"),
    Handler("guest_memfd", 1, "file", preserve="gmem_preserve", walk_probe="gmem_walk",
            walk=("count_pass", "fill_pass"),
            phases=("can_preserve", "count_pass", "fill_pass", "vmalloc", "luo_freeze", "unpreserve",
                    "retrieve", "finish"),
            fs_magic=(0x474D454D,), bpf_file="handlers/guest_memfd.c",
            ser=("guest_memfd_luo_ser", "guest_memfd_luo_folio_ser"),
            help="guest memory (the guest_memfd LUO patch under review)"),
    Handler("memfd", 2, "file", preserve="memfd_preserve", walk_probe="memfd_preserve_folios",
            walk=("preserve_folios", "preserve_folios"),
            phases=("can_preserve", "preserve_folios", "vmalloc", "luo_freeze", "unpreserve", "retrieve", "finish"),
            fs_magic=(0x01021994, 0x958458F6), bpf_file="handlers/memfd.c", walk_counts_on_error=False,
            ser=("memfd_luo_ser", "memfd_luo_folio_ser"),
            help="shared memory (mainline mm/memfd_luo.c)"),
    Handler("kho", 3, "core", help="Kexec HandOver: folios and metadata handed to the next kernel"),
    Handler("luo", 4, "core", help="Live Update Orchestrator: sessions, the blackout, the kexec"),
    Handler("population", 5, "population", follows="guest_memfd", bpf_file="population.c",
            help="folios entering and leaving guest_memfd page caches (filemap tracepoints)"),
)
HANDLER_BY_NAME: Dict[str, Handler] = {h.name: h for h in HANDLER_LIST}
HANDLERS: Dict[str, int] = {h.name: h.id for h in HANDLER_LIST}
HANDLER_NAMES: Dict[int, str] = {h.id: h.name for h in HANDLER_LIST}
FILE_HANDLERS: Tuple[str, ...] = tuple(h.name for h in HANDLER_LIST if h.kind == "file")
FILE_HANDLER_IDS = frozenset(HANDLERS[h] for h in FILE_HANDLERS)
# What --handler accepts: the file handlers, and a population alone.
TRACEABLE: Tuple[str, ...] = FILE_HANDLERS + tuple(h.name for h in HANDLER_LIST if h.kind == "population")
FS_MAGIC: Dict[str, Tuple[int, ...]] = {h.name: h.fs_magic for h in HANDLER_LIST if h.fs_magic}
# File handlers a population handler follows: their files' folios are counted as they enter.
POPULATED = frozenset(h.follows for h in HANDLER_LIST if h.kind == "population")


def _phase_order() -> Tuple[str, ...]:
    """Every phase a file of any handler shows, in lifecycle order: each
    handler's phases merged in (a new one goes before the next phase it shares
    with those already placed), and ``preserve``, which encloses the walk and
    vmalloc phases, after ``can_preserve``."""
    order: List[str] = []
    for h in HANDLER_LIST:
        for i, ph in enumerate(h.phases):
            if ph in order:
                continue
            nxt = next((order.index(q) for q in h.phases[i + 1:] if q in order), len(order))
            order.insert(nxt, ph)
    order.insert(order.index("can_preserve") + 1 if "can_preserve" in order else 0, "preserve")
    return tuple(order)


PHASE_ORDER: Tuple[str, ...] = _phase_order()
LEAF_PHASES: Tuple[str, ...] = tuple(p for p in PHASE_ORDER if p != "preserve")  # phases with no phase inside
# The walk pass that hands folios to KHO, per handler: where a timeline draws the folios going.
FILL_PHASES = frozenset(h.walk[1] for h in HANDLER_LIST if h.walk_probe)


def handler_kept(handler: str, files: Iterable[str]) -> bool:
    """The one rule of which handlers come together: a file handler when it
    is one of FILES, the core with any file handler, a population with the
    handler it follows.  Used by probes_for (what --handler asks for) and the
    loader (what the traced code has)."""
    files = set(files)
    h = HANDLER_BY_NAME[handler]
    if h.kind == "file":
        return handler in files
    if h.kind == "core":
        return bool(files & set(FILE_HANDLERS))
    if h.kind == "population":
        return h.follows in files or handler in files
    return False  # "none": no probe belongs to it

# Role of a handler operation while it runs on a thread (struct cur_v.role):
# per-folio KHO calls made meanwhile are attributed to that operation.
ROLES = {"none": 0, "preserve": 1, "unpreserve": 2, "retrieve": 3, "finish": 4, "luo_freeze": 5,
         "can_preserve": 6}


@dataclass(frozen=True)
class Probe:
    """One probe point.

    ``entry``/``ret`` map event slots (a0, a1, a2) to field names for the
    entry and return events; ``a2`` of a return event is always the call's
    duration in ns.  ``kind`` is ``function`` (entry + return), ``entry``
    (entry only: void functions whose effect is known at entry) or
    ``tracepoint``.
    """

    name: str
    symbol: str
    handler: str
    role: str
    kind: str = "function"
    required: bool = False
    modes: Tuple[str, ...] = MODES
    bpf_file: str = ""  # default: its handler's
    entry: Dict[str, str] = field(default_factory=dict)
    ret: Dict[str, str] = field(default_factory=dict)
    per_folio: bool = False
    # "calls" or "array": attached only when folio mode counts folios that way
    # (loader.folio_source); "" = whatever the folio source
    source: str = ""
    help: str = ""
    returns: str = "int"  # what the function returns: int (0 or -errno) or bool

    def __post_init__(self) -> None:
        if not self.bpf_file:
            object.__setattr__(self, "bpf_file", HANDLER_BY_NAME[self.handler].bpf_file)

    @property
    def entry_fn(self) -> str:
        if self.kind == "tracepoint":
            cat, ev = self.tracepoint  # type: ignore[misc]
            return f"tracepoint__{cat}__{ev}"
        return f"{self.name}_entry"

    @property
    def return_fn(self) -> Optional[str]:
        return f"{self.name}_return" if self.kind == "function" else None

    @property
    def tracepoint(self) -> Optional[Tuple[str, str]]:
        if self.kind != "tracepoint":
            return None
        cat, _, ev = self.symbol.partition(":")
        return cat, ev


def _op(name: str, symbol: str, handler: str, role: str, **kw) -> Probe:
    """A handler operation taking ``struct liveupdate_file_op_args *``."""
    kw.setdefault("entry", {"a0": "size", "a1": "flags"})
    kw.setdefault("ret", {"a0": "serialized_data"})
    return Probe(name, symbol, handler, role, **kw)


PROBES: Tuple[Probe, ...] = (
    # guest_memfd LUO handler (the patch under review).
    Probe("gmem_can_preserve", "kvm_gmem_luo_can_preserve", "guest_memfd", "can_preserve",
          entry={"a1": "sb_magic"}, returns="bool",
          help="verdict per file: private-mem VMs and large-folio mappings are refused"),
    _op("gmem_preserve", "kvm_gmem_luo_preserve", "guest_memfd", "preserve", required=True,
        help="whole preserve: freeze, count pass, vcalloc, fill pass, vmalloc"),
    Probe("gmem_freeze_inode", "kvm_gmem_freeze", "guest_memfd", "freeze_inode", kind="function",
          required=True, entry={"a0": "freeze"}, ret={},
          help="inode freeze (true) / unfreeze (false); blocks fallocate and faults.  A freeze counts from its "
               "return (it waits for allocations in flight), an unfreeze from its start"),
    Probe("gmem_walk", "kvm_gmem_luo_walk_folios", "guest_memfd", "walk",
          entry={"a0": "end_index", "a1": "fill"}, ret={"a0": "count", "a1": "fill"},
          help="pass 1 (count, folios_ser NULL) and pass 2 (fill); static, may be inlined"),
    _op("gmem_luo_freeze", "kvm_gmem_luo_freeze", "guest_memfd", "luo_freeze", required=True,
        ret={}, help="just before kexec, inside the blackout: resolves vm_token"),
    _op("gmem_unpreserve", "kvm_gmem_luo_unpreserve", "guest_memfd", "unpreserve", required=True,
        ret={}, help="cancel: unpreserve every folio, vfree, unfreeze"),
    _op("gmem_retrieve", "kvm_gmem_luo_retrieve", "guest_memfd", "retrieve",
        entry={}, ret={"a0": "new_inode"}, help="new kernel: rebuild the file from preserved folios"),
    _op("gmem_finish", "kvm_gmem_luo_finish", "guest_memfd", "finish", entry={}, ret={},
        help="new kernel: finish, or discard the folios of a file never retrieved"),
    # memfd LUO handler (mainline mm/memfd_luo.c).
    Probe("memfd_can_preserve", "memfd_luo_can_preserve", "memfd", "can_preserve",
          entry={"a1": "sb_magic"}, returns="bool", help="shmem file with no links"),
    _op("memfd_preserve", "memfd_luo_preserve", "memfd", "preserve", required=True,
        help="inode_lock, shmem_freeze, pin and preserve every folio"),
    Probe("memfd_shmem_freeze", "shmem_freeze", "memfd", "freeze_inode", kind="entry",
          entry={"a0": "freeze"}, help="shmem inode freeze / unfreeze"),
    Probe("memfd_preserve_folios", "memfd_luo_preserve_folios", "memfd", "walk",
          entry={}, ret={"a0": "count"}, help="pins and preserves every folio; static, may be inlined"),
    _op("memfd_luo_freeze", "memfd_luo_freeze", "memfd", "luo_freeze", ret={},
        help="just before kexec"),
    _op("memfd_unpreserve", "memfd_luo_unpreserve", "memfd", "unpreserve", required=True, ret={},
        help="cancel"),
    _op("memfd_retrieve", "memfd_luo_retrieve", "memfd", "retrieve", entry={}, ret={"a0": "new_inode"},
        help="new kernel: rebuild the memfd"),
    _op("memfd_finish", "memfd_luo_finish", "memfd", "finish", entry={}, ret={},
        help="new kernel: finish or discard"),
    # KHO core, lifecycle-level.
    Probe("kho_preserve_vmalloc", "kho_preserve_vmalloc", "kho", "vmalloc", ret={},
          help="preserves the handler's folio metadata array"),
    Probe("kho_unpreserve_vmalloc", "kho_unpreserve_vmalloc", "kho", "unvmalloc", kind="entry",
          help="releases the folio array on cancel; in folio mode its one program run counts the cancel: "
               "ser->nr_folios less the pfn 0 entries its preserve's array walk found"),
    # LUO core: sessions and the blackout.
    Probe("luo_preserve_file", "luo_preserve_file", "luo", "session_preserve",
          entry={"a0": "token", "a1": "fd", "a2": "session"},
          help="ties a file (token, fd) to its session"),
    Probe("luo_file_freeze", "luo_file_freeze", "luo", "session_freeze", entry={"a2": "session"},
          help="freezes every file of a session just before kexec: the blackout"),
    Probe("luo_unpreserve_files", "luo_file_unpreserve_files", "luo", "session_cancel", kind="entry",
          entry={"a2": "session"}, help="session cancelled"),
    Probe("luo_get_token", "liveupdate_get_token_outgoing", "luo", "token", ret={"a0": "token"},
          help="vm_token lookup inside the guest_memfd freeze"),
    # KHO core, per folio (folio and trace modes only).
    Probe("kho_preserve_folio", "kho_preserve_folio", "kho", "folio_preserve", bpf_file="kho.c",
          modes=("folio", "trace"), required=True, per_folio=True, ret={"a0": "pfn", "a1": "index"},
          source="calls",
          help="marks one folio for handover: count, latency histogram, errors, pfn 0 (trace mode, "
               "--folio-latency, or a handler whose folio array luotrace cannot read)"),
    Probe("kho_unpreserve_folio", "kho_unpreserve_folio", "kho", "folio_unpreserve", kind="entry",
          bpf_file="kho.c", modes=("folio", "trace"), per_folio=True, entry={"a0": "pfn"}, source="calls",
          help="releases one folio (unwind or cancel; trace mode, --folio-latency, or a handler whose folio "
               "array luotrace cannot read)"),
    Probe("kho_restore_folio", "kho_restore_folio", "kho", "folio_restore", kind="entry",
          bpf_file="kho.c", modes=("folio", "trace"), per_folio=True, entry={"a0": "pfn"}, source="calls",
          help="new kernel: takes one preserved folio back (retrieve or discard; trace mode, "
               "--folio-latency, or a handler whose folio array luotrace cannot read)"),
    # guest_memfd population, through the real kernel's tracepoints.
    Probe("pop_add", "filemap:mm_filemap_add_to_page_cache", "population", "pop_add",
          kind="tracepoint", bpf_file="population.c", modes=("folio", "trace"), per_folio=True,
          entry={"a0": "index", "a1": "pfn", "a2": "order"},
          help="a folio enters a guest_memfd page cache; an event only when the inode is frozen"),
    Probe("pop_delete", "filemap:mm_filemap_delete_from_page_cache", "population", "pop_delete",
          kind="tracepoint", bpf_file="population.c", modes=("folio", "trace"), per_folio=True,
          entry={"a0": "index", "a1": "pfn", "a2": "order"},
          help="a folio leaves a guest_memfd page cache; counted (also while frozen), no event"),
    # Added later: ids are positions in this tuple and recordings store them, so append only.
    Probe("kho_alloc_preserve", "kho_alloc_preserve", "kho", "meta_alloc", entry={"a0": "size"}, ret={},
          help="KHO-preserved metadata page; its own kho_preserve_folio is counted apart from the file's folios"),
    Probe("kho_unpreserve_free", "kho_unpreserve_free", "kho", "meta_free", ret={},
          help="releases that metadata page (its kho_unpreserve_folio is not a data folio)"),
    Probe("kexec", "kernel_kexec", "luo", "kexec", kind="entry",
          help="the jump to the next kernel starts; LUO freezes every session next, so the recording is "
               "flushed at once and drained until the machine goes"),
    Probe("kho_vmalloc_page", "kho_preserve_pages", "kho", "vmalloc_page", kind="entry", bpf_file="kho.c",
          modes=("folio",), required=True, source="array",
          help="each page of a handler's serialized folio array, inside kho_preserve_vmalloc: its 256 "
               "entries are counted and checked (pfn 0) in one program run, no event"),
    Probe("kho_restore_vmalloc", "kho_restore_vmalloc", "kho", "restore_vmalloc", bpf_file="kho.c",
          modes=("folio",), source="array",
          help="new kernel: a retrieve or discard takes its file's folio array back; ser->nr_folios, less "
               "the pfn 0 entries, is the folios it restores or discards, no event"),
    Probe("kho_restore_array_page", "kho_restore_pages", "kho", "restore_page", kind="entry", bpf_file="kho.c",
          modes=("folio",), source="array",
          help="each page of that array, inside kho_restore_vmalloc: its 256 entries checked (pfn 0) in one "
               "program run, no event"),
)

@dataclass(frozen=True)
class Revision:
    """A revision of a handler's patch series, told apart by the ops the
    traced code has: ``has`` are probes only it (of those listed) has,
    ``lacks`` probes it dropped.  doctor names the revision a kernel looks
    like, and a probe some revision dropped is never required of a kernel
    that looks like that revision."""
    handler: str
    name: str
    has: Tuple[str, ...] = ()
    lacks: Tuple[str, ...] = ()
    help: str = ""


# The guest_memfd LUO series (../shared/kernel/NOTES.md §8; the lane builds
# each as workloads/vm/series/<name>).
REVISIONS: Tuple[Revision, ...] = (
    Revision("guest_memfd", "seed", has=("gmem_luo_freeze",),
             help="RFC v2 (5 June 2026) to v4: a freeze op, kvm_gmem_luo_freeze, takes the VM token just before kexec"),
    Revision("guest_memfd", "latest", lacks=("gmem_luo_freeze",),
             help="later tree states: no freeze op; preserve takes the VM token itself (-ENOENT while the VM file "
                  "is not in the session)"),
)
DROPPED_BY: Dict[str, Tuple[str, ...]] = {}  # probe -> the revisions that dropped it
for _r in REVISIONS:
    for _p in _r.lacks:
        DROPPED_BY[_p] = DROPPED_BY.get(_p, ()) + (_r.name,)


def revision_of(handler: str, present: Iterable[str]) -> Optional[Revision]:
    """The revision of HANDLER whose ops match the probes PRESENT (names), if one does."""
    have = set(present)
    for r in REVISIONS:
        if r.handler == handler and set(r.has) <= have and not set(r.lacks) & have:
            return r
    return None


PROBE_IDS: Dict[str, int] = {p.name: i for i, p in enumerate(PROBES)}
BY_NAME: Dict[str, Probe] = {p.name: p for p in PROBES}
BY_SYMBOL: Dict[str, Probe] = {p.symbol: p for p in PROBES}


def probes_for(mode: str, handlers: Optional[Iterable[str]] = None) -> List[Probe]:
    """Probes attached in ``mode`` for ``handlers`` (default: all of TRACEABLE);
    which come together is handler_kept's rule."""
    want = set(TRACEABLE if handlers is None else handlers)
    return [p for p in PROBES if mode in p.modes and handler_kept(p.handler, want)]


def bpf_defines() -> Dict[str, int]:
    """Constants shared with the BPF C: probe ids, handler and role ids."""
    d = {f"PROBE_{p.name}": i for i, p in enumerate(PROBES)}
    d.update({f"HANDLER_{k.upper()}": v for k, v in HANDLERS.items()})
    d.update({f"ROLE_{k.upper()}": v for k, v in ROLES.items()})
    return d
