"""Generated documentation: the handler and probe tables (docs/developers.md)
come from the catalog, the fleet schema's (docs/fleet.md) from
tracer/fleet/schema.py.

``python -m tracer.cli.docs`` rewrites them in place; tests/test_catalog.py fails
when a page and its source disagree.
"""
from __future__ import annotations

import os
import re

from tracer.probes import catalog
from tracer.fleet import schema as fs

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs")
BEGIN, END = "<!-- probe-table:begin -->", "<!-- probe-table:end -->"
H_BEGIN, H_END = "<!-- handler-table:begin -->", "<!-- handler-table:end -->"
F_BEGIN, F_END = "<!-- fleet-schema:begin -->", "<!-- fleet-schema:end -->"


def handler_table() -> str:
    rows = ["| handler | id | kind | present when | walk phases | BPF | what it is |", "|---|---|---|---|---|---|---|"]
    for h in catalog.HANDLER_LIST:
        if h.kind == "none":
            continue
        present = f"`{catalog.BY_NAME[h.preserve].symbol}` attaches" if h.preserve else \
            (f"with {h.follows}" if h.follows else "with any file handler")
        walk = " / ".join(dict.fromkeys(h.walk)) if h.walk_probe else ""
        rows.append(f"| {h.name} | {h.id} | {h.kind} | {present} | {walk} | `bpf/{h.bpf_file}` | {h.help} |")
    return "\n".join(rows)


def probe_table() -> str:
    rows = ["| probe | symbol | handler | kind | modes | required | what it gives |", "|---|---|---|---|---|---|---|"]
    for p in catalog.PROBES:
        rows.append(f"| {p.name} | `{p.symbol}` | {p.handler} | {p.kind} | {', '.join(p.modes)} | "
                    f"{'yes' if p.required else ''} | {p.help} |")
    return "\n".join(rows)


def fleet_schema_table() -> str:
    """The fleet dataset's columns (tracer/fleet/schema.py), the per-phase
    duration columns of ``files`` as one row."""
    phase_cols = {f"{p}_ns" for p in catalog.PHASE_ORDER}
    rows = [f"Schema `{fs.VERSION}`; every table is hive-partitioned by "
            + " and ".join(f"`{p}`" for p in fs.PARTITIONS) + " (strings).", "",
            "| table | column | type | what it holds |", "|---|---|---|---|"]
    for t, cols in fs.COLUMNS.items():
        folded = False
        for name, ty, why in cols:
            if t == "files" and name in phase_cols:
                if not folded:
                    names = ", ".join(f"`{p}_ns`" for p in catalog.PHASE_ORDER)
                    rows.append(f"| {t} | {names} | `{ty}` | total duration of that phase (null if it did not run) |")
                    folded = True
                continue
            rows.append(f"| {t} | `{name}` | `{ty}` | {why} |")
    return "\n".join(rows)


# (page under docs/, begin marker, end marker, what makes the table)
GENERATED = (("developers.md", BEGIN, END, probe_table), ("developers.md", H_BEGIN, H_END, handler_table),
             ("fleet.md", F_BEGIN, F_END, fleet_schema_table))


def generated(page: str, begin: str, end: str) -> str:
    """The text between a pair of markers in a page."""
    return page.split(begin + "\n")[1].split("\n" + end)[0]


def update_docs(root: str = DOCS) -> list:
    """Rewrite the generated tables; the pages that changed."""
    changed = []
    for name in sorted({g[0] for g in GENERATED}):
        path = os.path.join(root, name)
        with open(path) as f:
            text = f.read()
        new = text
        for page, begin, end, make in GENERATED:
            if page == name:
                new = re.sub(re.escape(begin) + ".*" + re.escape(end), lambda _m: f"{begin}\n{make()}\n{end}", new,
                             flags=re.S)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            changed.append(name)
    return changed


if __name__ == "__main__":
    done = update_docs()
    print(f"docs updated: {', '.join(done)}" if done else "docs already up to date")
