"""The catalog and the BPF sources agree; the README's probe table is the
catalog's."""
from __future__ import annotations

import os
import re

from tests.conftest import REPO
from tracer import catalog
from tracer.docs import probe_table

BPF = {n: open(os.path.join(REPO, "bpf", n)).read() for n in os.listdir(os.path.join(REPO, "bpf"))}


def defined_functions(text):
    names = set(re.findall(r"^int (\w+)\(struct pt_regs \*ctx\)", text, re.M))
    for name in re.findall(r"^ARGS_OP\((\w+),", text, re.M):
        names |= {f"{name}_entry", f"{name}_return"}
    for cat, ev in re.findall(r"^TRACEPOINT_PROBE\((\w+), (\w+)\)", text, re.M):
        names.add(f"tracepoint__{cat}__{ev}")
    return names


def test_every_probe_has_its_handlers_in_its_file():
    for p in catalog.PROBES:
        fns = defined_functions(BPF[p.bpf_file])
        assert p.entry_fn in fns, (p.name, p.bpf_file)
        if p.return_fn:
            assert p.return_fn in fns, p.name


def test_every_bpf_program_belongs_to_a_probe():
    known = {p.entry_fn for p in catalog.PROBES} | {p.return_fn for p in catalog.PROBES if p.return_fn}
    for name, text in BPF.items():
        assert defined_functions(text) <= known, name


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


def test_readme_probe_table_is_generated_from_the_catalog():
    readme = open(os.path.join(REPO, "README.md")).read()
    table = readme.split("<!-- probe-table:begin -->\n")[1].split("\n<!-- probe-table:end -->")[0]
    assert table == probe_table()
