"""The import rule of tracer/layers.py holds on the tree, and the check
fails on a tree where it does not (a test of the test: wrong-way imports
planted in a copy, each found and named)."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from tests.conftest import REPO
from tracer import layers

ROOT = pathlib.Path(REPO)


def test_the_tree_keeps_the_layer_rule():
    assert layers.violations(ROOT) == []


def test_every_tracer_folder_is_a_layer_and_says_what_it_holds():
    folders = {p.parent for p in (ROOT / "tracer").rglob("__init__.py")} - {ROOT / "tracer"}
    for d in folders:
        mod = ".".join(d.relative_to(ROOT).parts)
        assert layers.layer_of(mod) is not None, f"{mod}: add it to tracer/layers.py"
        if mod != "tracer.schemas":  # a data package: its docstring is its schemas' story
            doc = (d / "__init__.py").read_text()
            says = doc.startswith('"""') and "import" in doc.lower().split('"""')[1]
            assert says, f"{d}/__init__.py: say what it holds and what it may import"


@pytest.fixture
def tree(tmp_path):
    for top in layers.ROOTS:
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__", "*.o", "model"))
    return tmp_path


def _plant(tree: pathlib.Path, rel: str, line: str) -> None:
    p = tree / rel
    p.write_text(p.read_text() + f"\n\ndef _planted():\n    {line}\n")


@pytest.mark.parametrize("rel, line, says", [
    ("tracer/analysis/report.py", "from exporters.text import render", "exporters is a later layer than tracer.analysis"),
    ("tracer/analysis/compare.py", "from tracer.cli import main", "tracer.cli is a later layer than tracer.analysis"),
    ("tracer/live/runner.py", "from tracer.fleet import dataset", "tracer.fleet and tracer.live are siblings"),
    ("tracer/recording/format.py", "import tracer.attach.ringbuf", "tracer.attach and tracer.recording are siblings"),
    ("exporters/text.py", "from tracer.service.serve import serve_live", "tracer.service is a later layer than exporters"),
    ("workloads/gmem.py", "from tracer.service import serve", "workloads/ may use only"),
    ("tracer/kernel/btf.py", "from workloads import truth", "luotrace never imports its workloads"),
])
def test_a_planted_wrong_way_import_is_found_and_named(tree, rel, line, says):
    assert layers.violations(tree) == []
    _plant(tree, rel, line)
    found = layers.violations(tree)
    assert len(found) == 1 and found[0].startswith(f"{rel}:") and says in found[0], found


def test_import_graph_sees_no_circle():
    tool = ROOT.parent / "shared" / "tools" / "import-graph"
    if not tool.exists():
        pytest.skip("../shared/tools/import-graph is not beside this checkout (a clean clone elsewhere)")
    out = subprocess.run([str(tool)], cwd=ROOT, capture_output=True, text=True)
    assert "import circle" not in out.stdout and "import the wrong way" not in out.stdout, out.stdout
