"""Generated documentation: the README's handler and probe tables come from
the catalog.

``python -m tracer.docs`` rewrites them in place; tests/test_catalog.py fails
when the README and the catalog disagree.
"""
from __future__ import annotations

import os
import re

from . import catalog

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- probe-table:begin -->", "<!-- probe-table:end -->"
H_BEGIN, H_END = "<!-- handler-table:begin -->", "<!-- handler-table:end -->"


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


def update_readme(path: str = README) -> bool:
    with open(path) as f:
        text = f.read()
    new = re.sub(re.escape(BEGIN) + ".*" + re.escape(END), lambda _m: f"{BEGIN}\n{probe_table()}\n{END}", text,
                 flags=re.S)
    new = re.sub(re.escape(H_BEGIN) + ".*" + re.escape(H_END), lambda _m: f"{H_BEGIN}\n{handler_table()}\n{H_END}",
                 new, flags=re.S)
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    print("README.md updated" if update_readme() else "README.md already up to date")
