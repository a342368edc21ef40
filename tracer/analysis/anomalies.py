"""Anomaly checks: the patch review's concerns, as rules over one file's trace.

Each rule returns a detail string (the evidence) when it fires.  A clean run
has none.  Rules that need per-folio counters only run in folio/trace mode;
in light mode they are listed as not checked rather than passed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

from tracer.analysis.aggregator import FileState
from tracer.base.units import PAGE_SIZE



@dataclass
class Finding:
    """One rule's verdict: the sentence, and its evidence as fields."""
    detail: str
    count: Optional[int] = None  # folios, pages or events concerned
    first_index: Optional[int] = None  # page-cache index of the first one
    pfn: Optional[int] = None
    time_ns: Optional[int] = None  # monotonic time of the first evidence


def _phase_end(st: FileState, name: str) -> Optional[int]:
    ends = [p.start_ns + p.duration_ns for p in st.phases if p.name == name]
    return min(ends) if ends else None


class Facts:
    """What the rules read about one file: its state and its map counters."""

    def __init__(self, st: FileState, folio: Optional[dict], pop: Optional[dict], pop_whole: bool = True):
        self.st = st
        self.folio = folio  # folio_stats row (None in light mode or if never touched)
        self.pop = pop  # population row
        self.pop_whole = pop_whole  # False: counted only during updates, not since the file began


def folio_added_while_frozen(f: Facts) -> Optional[Finding]:
    """Review: 'to lock out all allocates, you'd have to take filemap_invalidate_lock() before freezing'."""
    adds = [c for c in f.st.frozen_changes if c[1] == "add"]
    if not adds:
        return None
    ts, _k, index, pfn, order = adds[0]
    return Finding(f"{f.st.frozen_adds} folio(s) added to the page cache while the inode was frozen; "
                   f"first at index {index} (pfn {pfn:#x}, order {order})", f.st.frozen_adds, index, pfn, ts)


def pass_count_mismatch(f: Facts) -> Optional[Finding]:
    """Review: pass 1 and pass 2 counts differ (the WARN_ON_ONCE)."""
    st = f.st
    if st.count_pass is None or st.fill_count is None or st.fill_ret not in (0, None):
        return None
    when = _phase_end(st, "fill_pass")
    if st.fill_count != st.count_pass:
        return Finding(f"pass 1 counted {st.count_pass} folios, pass 2 preserved {st.fill_count}",
                       abs(st.fill_count - st.count_pass), time_ns=when)
    if f.folio is not None and f.folio["preserved"] is not None and f.folio["preserved"] != st.count_pass:
        return Finding(f"pass 1 counted {st.count_pass} folios, kho_preserve_folio succeeded "
                       f"{f.folio['preserved']} times", abs(f.folio["preserved"] - st.count_pass), time_ns=when)
    return None


def unwind_incomplete(f: Facts) -> Optional[Finding]:
    """Review: after an error (or a cancel) every preserved folio must be unpreserved."""
    st = f.st
    if f.folio is None:
        return None
    failed_in_preserve = st.failed_phase == "preserve"
    cancelled = any(p.name == "unpreserve" for p in st.phases)
    if not (failed_in_preserve or cancelled):
        return None
    done, undone = f.folio["preserved"], f.folio["unpreserved"]
    if done is None or undone is None:
        return None  # not known: folio mode read the folio arrays, and a failed preserve's unwind hands none
    if done != undone:
        why = f"preserve failed with {st.errno}" if failed_in_preserve else "unpreserve"
        return Finding(f"{why}: {done} folio(s) preserved but {undone} unpreserved", abs(done - undone),
                       time_ns=_phase_end(st, "preserve" if failed_in_preserve else "unpreserve"))
    return None


def freeze_unbalanced(f: Facts) -> Optional[Finding]:
    """Review: freeze(true) must be undone on every error and unpreserve path."""
    log = f.st.freeze_log
    if not log:
        return None
    depth = 0
    for ts, on in log:
        depth += 1 if on else -1
        if depth < 0:
            return Finding("inode unfrozen without a matching freeze", 1, time_ns=ts)
    should_be_frozen = f.st.result in ("ok", "retrieved", "discarded")
    if depth > 0 and not should_be_frozen:
        return Finding(f"inode left frozen after {f.st.result}" + (f" ({f.st.errno} in {f.st.failed_phase})"
                                                                   if f.st.errno else ""), depth, time_ns=log[-1][0])
    return None


def pfn_zero(f: Facts) -> Optional[Finding]:
    """Review: 'Is it possible for pfn to be 0 here?'"""
    if f.folio is not None and f.folio.get("pfn_zero"):
        return Finding(f"{f.folio['pfn_zero']} folio(s) preserved with pfn 0", f.folio["pfn_zero"], pfn=0,
                       time_ns=_phase_end(f.st, "preserve"))
    return None


def holes(f: Facts) -> Optional[Finding]:
    """Only pre-allocated guest_memfds are supported: holes are guest memory not preserved."""
    st = f.st
    if st.handler != "guest_memfd" or not st.size:
        return None
    pages = st.size // PAGE_SIZE
    present = st.count_pass
    if present is None and st.result == "error":
        return None  # failed before its walk: nothing of it is preserved, and its teardown empties the count
    if present is None and f.pop is not None and f.pop_whole:
        present = f.pop["added"] - f.pop["deleted"]
    if present is None or present >= pages:
        return None
    return Finding(f"{pages - present} of {pages} pages not populated: that guest memory is not preserved",
                   pages - present, time_ns=_phase_end(st, "count_pass") or _phase_end(st, "preserve"))


def large_folios(f: Facts) -> Optional[Finding]:
    """can_preserve refuses large-folio mappings."""
    if f.pop is not None and f.pop.get("large"):
        return Finding(f"{f.pop['large']} large folio(s) (order up to {f.pop['max_order']}) in the page cache",
                       f.pop["large"], time_ns=_phase_end(f.st, "can_preserve"))
    return None


RULES: Dict[str, Callable[[Facts], Optional[Finding]]] = {
    "folio_added_while_frozen": folio_added_while_frozen,
    "pass_count_mismatch": pass_count_mismatch,
    "unwind_incomplete": unwind_incomplete,
    "freeze_unbalanced": freeze_unbalanced,
    "pfn_zero": pfn_zero,
    "holes": holes,
    "large_folios": large_folios,
}
NEEDS_FOLIO_MODE = ("folio_added_while_frozen", "unwind_incomplete", "pfn_zero", "large_folios")


def check(f: Facts, base_ns: int = 0) -> List[dict]:
    """Every rule that fires, with its evidence as fields (time relative to BASE_NS)."""
    out = []
    for code, rule in RULES.items():
        found = rule(f)
        if found:
            d = {"code": code, **asdict(found)}
            if found.time_ns is not None:
                d["time_ns"] = found.time_ns - base_ns
            out.append(d)
    return out
