"""Generated documentation: the README's probe table comes from the catalog.

``python -m tracer.docs`` rewrites it in place; tests/test_catalog.py fails
when the README and the catalog disagree.
"""
from __future__ import annotations

import os
import re

from . import catalog

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- probe-table:begin -->", "<!-- probe-table:end -->"


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
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    print("README.md updated" if update_readme() else "README.md already up to date")
