"""The catalog and the BPF sources agree; the docs' probe table is the
catalog's."""
from __future__ import annotations

import os
import re

from tests.conftest import REPO
from tracer.probes import catalog
from tracer.cli.docs import GENERATED, generated

BPF = {os.path.relpath(os.path.join(d, n), os.path.join(REPO, "bpf")): open(os.path.join(d, n)).read()
       for d, _dirs, names in os.walk(os.path.join(REPO, "bpf")) for n in names if n.endswith((".c", ".h"))}


def defined_functions(text):
    """Handler bodies and tracepoint programs defined in one BPF file."""
    names = set(re.findall(r"^static __always_inline int (\w+_(?:entry|return)_body)\(", text, re.M))
    for name in re.findall(r"^ARGS_OP\((\w+),", text, re.M):
        names |= {f"{name}_entry_body", f"{name}_return_body"}
    names |= {f"{n}_entry_body" for n in re.findall(r"^BODY_ENTRY\((\w+)\)", text, re.M)}
    names |= {f"{n}_return_body" for n in re.findall(r"^BODY_RETURN\((\w+),", text, re.M)}
    for cat, ev in re.findall(r"^TRACEPOINT_PROBE\((\w+), (\w+)\)", text, re.M):
        names.add(f"tracepoint__{cat}__{ev}")
    return names


def expected(p):
    if p.kind == "tracepoint":
        return {p.entry_fn}
    return {f"{p.name}_entry_body"} | ({f"{p.name}_return_body"} if p.return_fn else set())


def test_every_probe_has_its_handlers_in_its_file():
    for p in catalog.PROBES:
        assert expected(p) <= defined_functions(BPF[p.bpf_file]), (p.name, p.bpf_file)


def test_every_bpf_handler_belongs_to_a_probe():
    known = set().union(*(expected(p) for p in catalog.PROBES))
    for name, text in BPF.items():
        assert defined_functions(text) <= known, name


def test_generated_entry_points_for_each_attach_type():
    from tracer.probes.program import wrappers
    probes = [catalog.BY_NAME["gmem_preserve"], catalog.BY_NAME["gmem_unpreserve"]]
    k = wrappers(probes, {}, {})
    assert "int gmem_preserve_entry(struct pt_regs *ctx)" in k and "PT_REGS_RC(ctx)" in k
    f = wrappers(probes, {"gmem_preserve": "fentry", "gmem_unpreserve": "fentry"},
                 {"kvm_gmem_luo_preserve": (1, False), "kvm_gmem_luo_unpreserve": (1, True)})
    assert "int kfunc__kvm_gmem_luo_preserve(u64 *ctx) { u64 a[4] = {}; bpf_probe_read_kernel(&a[0], 8, &ctx[0]);" in f
    assert "bpf_probe_read_kernel(&rc, 8, &ctx[1]);" in f  # fexit: return value after the argument
    assert "int kretfunc__kvm_gmem_luo_unpreserve(u64 *ctx) { u64 rc = 0; return" in f  # void function


def test_names_ids_and_modes():
    names = [p.name for p in catalog.PROBES]
    assert len(names) == len(set(names))
    assert len({p.symbol for p in catalog.PROBES}) == len(names)
    assert all(set(p.modes) <= set(catalog.MODES) for p in catalog.PROBES)
    assert not any(p.per_folio for p in catalog.probes_for("light"))
    assert catalog.bpf_defines()["PROBE_gmem_preserve"] == catalog.PROBE_IDS["gmem_preserve"]


def test_probe_selection_by_handler():
    pop = {p.handler for p in catalog.probes_for("folio", ["population"])}
    assert pop == {"population"}
    memfd = {p.handler for p in catalog.probes_for("folio", ["memfd"])}
    assert memfd == {"memfd", "kho", "luo"}


def test_docs_tables_are_generated_from_the_catalog_and_the_fleet_schema():
    for page, begin, end, make in GENERATED:
        text = open(os.path.join(REPO, "docs", page)).read()
        assert generated(text, begin, end) == make(), f"docs/{page} {begin}: run python -m tracer.cli.docs"


def test_which_handlers_come_together_is_one_rule():
    """probes_for (what --handler asks for) and the loader's selection (what
    the traced code has) both use catalog.handler_kept."""
    from tracer.probes.plan import Options, ProbeStatus, select_handlers
    st = [ProbeStatus(p.name, p.symbol, p.handler, p.required, "kprobe", "planned") for p in catalog.PROBES
          if p.name != "memfd_preserve"]  # memfd absent from the traced code
    chosen = {s.handler for s in select_handlers(st, Options())}
    assert chosen == {h.name for h in catalog.HANDLER_LIST if catalog.handler_kept(h.name, {"guest_memfd"})} \
        == {p.handler for p in catalog.probes_for("folio", ["guest_memfd"])} == {"guest_memfd", "kho", "luo", "population"}
