"""The order of luotrace's layers, written once, and the check that keeps
imports to it (tests/test_layers.py runs it on the tree).

The rule in one sentence: a module imports only its own folder and the
layers before its own, never a sibling folder of its own layer, and never a
later one (imports inside functions count); workloads/ and dashboards/ use
the layers up to tracer.probes and the model runner only.

Nothing here is imported by luotrace itself."""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

# Lowest first.  Folders in one tuple are siblings: neither imports the other.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("tracer.base", "tracer.schemas"),  # plain helpers: errors, output files, sizes, JSON Schemas
    ("tracer.kernel",),                 # kernel and host facts and calls: ABI, BTF, bpf(2), clocks, KVM
    ("tracer.probes",),                 # the probe catalog and what it means here: plan, program text, decode
    ("tracer.attach", "tracer.recording"),  # BCC load/attach/read | the recording file format
    ("tracer.analysis",),               # events -> timelines, reports, anomalies, compare (no root needed)
    ("tracer.fleet", "tracer.live"),    # many recordings as a dataset | one live run on this host
    ("exporters",),                     # renderers: text, Prometheus, Perfetto, compare's table and plot
    ("tracer.service",),                # `serve`: HTTP, readiness, the update export
    ("tracer.cli",),                    # the commands; nothing imports them
)
# What the workloads (and the dashboard generator) may use of the tracer.
USERS = ("workloads", "dashboards")
USERS_MAY = ("tracer.base", "tracer.schemas", "tracer.kernel", "tracer.probes", "tracer.live.model")
ROOTS = ("tracer", "exporters") + USERS


def layer_of(module: str) -> Optional[int]:
    """Index in LAYERS of the folder MODULE is in; the package root
    (tracer/__init__, tracer.layers) counts as the lowest layer."""
    for i, folders in enumerate(LAYERS):
        if any(module == f or module.startswith(f + ".") for f in folders):
            return i
    if module in ("tracer", "tracer.layers"):
        return 0
    return None


def _folder(module: str) -> str:
    for folders in LAYERS:
        for f in folders:
            if module == f or module.startswith(f + "."):
                return f
    return module.split(".")[0]


def modules(root: pathlib.Path) -> Dict[str, pathlib.Path]:
    out = {}
    for top in ROOTS:
        for p in sorted((root / top).rglob("*.py")):
            name = ".".join(p.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def imports(module: str, path: pathlib.Path) -> Iterator[Tuple[int, str]]:
    """(line, imported module) for every import in PATH, at any depth."""
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            for a in n.names:
                yield n.lineno, a.name
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - (n.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            yield n.lineno, base
            for a in n.names:  # `from tracer.kernel import kvm` imports tracer.kernel.kvm
                yield n.lineno, f"{base}.{a.name}"


def violations(root: pathlib.Path) -> List[str]:
    """Every import that breaks the rule, as 'path:line: A imports B (why)'."""
    mods = modules(root)
    out = []
    for mod, path in mods.items():
        top = mod.split(".")[0]
        worst: Dict[int, Tuple[str, str]] = {}  # per line, the most specific module it breaks the rule with
        for line, target in imports(mod, path):
            if target.split(".")[0] not in ("tracer", "exporters", "workloads") or target not in mods and \
                    not any(m.startswith(target + ".") for m in mods):
                continue  # a library, or a name imported from a module (checked as the module itself)
            why = _why(mod, top, target)
            if why and len(target) > len(worst.get(line, ("", ""))[0]):
                worst[line] = (target, why)
        out += [f"{path.relative_to(root)}:{line}: {mod} imports {t} ({why})" for line, (t, why) in sorted(worst.items())]
    return out


def _why(mod: str, top: str, target: str) -> str:
    if top in USERS:
        if target.split(".")[0] in ("workloads", "dashboards"):
            return ""
        if target == "tracer" or any(target == u or target.startswith(u + ".") for u in USERS_MAY):
            return ""
        return f"{top}/ may use only {', '.join(USERS_MAY)}"
    if target.split(".")[0] in USERS:
        return "luotrace never imports its workloads"
    mine, theirs = layer_of(mod), layer_of(target)
    if mine is None or theirs is None:
        return f"{mod if mine is None else target} is in no layer: add its folder to tracer/layers.py"
    if theirs > mine:
        return f"{_folder(target)} is a later layer than {_folder(mod)}"
    if theirs == mine and _folder(target) != _folder(mod) and target != "tracer":
        return f"{_folder(target)} and {_folder(mod)} are siblings"
    return ""


def order() -> Sequence[str]:
    """The layers as one line each (for docs)."""
    return [" | ".join(f) for f in LAYERS]
