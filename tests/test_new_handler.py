"""Issue 13's proof that a LUO file handler is data: a synthetic third file
handler, added to a copy of this tree as its catalog entry, its BPF file and
its model part (tests/data/synth_handler/), and nothing else, is traced live
through real uprobes on the rebuilt model; its files' counts equal the model's
ground truth and its series reach the exporter with their own handler label."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys

from tracer.live.model import compare

from .conftest import REPO

DATA = os.path.join(REPO, "tests", "data", "synth_handler")
SKIP = {".git", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "build", "luo_model"}
ADDED = {os.path.join("bpf", "handlers", "synth.c"): "bpf.c",
         os.path.join("workloads", "model", "handlers", "synth.c"): "model.c"}


def _copy_tree(dst: str) -> None:
    shutil.copytree(REPO, dst, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])


def _add_handler(tree: str) -> None:
    """The three parts of the recipe in docs/developers.md; the test's own data besides."""
    handler, probes = open(os.path.join(DATA, "catalog.py.in")).read().split("# --- probes ---\n")
    path = os.path.join(tree, "tracer", "probes", "catalog.py")
    src = open(path).read()
    for anchor, block in (("HANDLER_BY_NAME: Dict", handler), ("PROBE_IDS: Dict", probes)):
        assert src.count("\n" + anchor) == 1, anchor
        src = src.replace("\n" + anchor, "\n" + block + "\n" + anchor)
    with open(path, "w") as f:
        f.write(src)
    for rel, name in ADDED.items():
        shutil.copy(os.path.join(DATA, name), os.path.join(tree, rel))


def _edited(tree: str) -> set:
    """Files of TREE that differ from this checkout's, or are new."""
    out = set()
    for d, dirs, files in os.walk(tree):
        dirs[:] = [x for x in dirs if x not in SKIP]
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), tree)
            if name in SKIP or rel.startswith("tests" + os.sep + "data" + os.sep + "synth_handler"):
                continue
            mine = os.path.join(REPO, rel)
            if not os.path.exists(mine) or not filecmp.cmp(mine, os.path.join(d, name), shallow=False):
                out.add(rel)
    return out


def test_a_third_file_handler_is_its_catalog_entry_bpf_and_model_part(root, gmem, tmp_path):
    tree = str(tmp_path / "tree")
    _copy_tree(tree)
    _add_handler(tree)
    assert _edited(tree) == {os.path.join("tracer", "probes", "catalog.py"), *ADDED}

    subprocess.run(["make", "-s", "-C", tree, "model"], check=True, capture_output=True, text=True)
    model = os.path.join(tree, "workloads", "model", "luo_model")
    env = {**os.environ, "PYTHONPATH": tree}
    where = subprocess.run([sys.executable, "-c", "import tracer; print(tracer.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(tree), where  # the copy's tracer, not this checkout's

    out, truth_path, prom = (str(tmp_path / n) for n in ("synth.luo", "truth.json", "metrics"))
    sessions = ["kexec:synth:1M,gmem:512K,memfd:256K", "cancel:synth:512K", "discard:synth:256K",
                "keep:synth:256K:vmalloc_fail"]
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "record", "--mode", "folio", "--model", model,
                        "-o", out, "--json", "--", model, "--json", truth_path, *sessions],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    truth = json.load(open(truth_path))

    synth = [t for t in truth["files"] if t["handler"] == "synth"]
    assert [t["result"] for t in synth] == ["retrieved", "cancelled", "discarded", "error"]
    assert [t["folios_preserved"] for t in synth] == [256, 128, 64, 64]
    assert compare(report, truth) == []  # every file of every handler, counts and results
    files = {f["inode"]: f for f in report["files"]}
    first = files[synth[0]["inode"]]
    assert first["handler"] == "synth"
    assert [p["name"] for p in first["phases"]] == ["can_preserve", "preserve", "synth_folios", "vmalloc",
                                                    "luo_freeze", "retrieve", "finish"]
    assert next(p for p in first["phases"] if p["name"] == "synth_folios")["count"] == 256
    assert files[synth[3]["inode"]]["failed_phase"] == "preserve"

    subprocess.run([sys.executable, "-m", "tracer.cli", "export", out, "--textfile", prom], cwd=tree, env=env,
                   check=True, capture_output=True, text=True)
    metrics = open(prom).read()
    assert 'luotrace_folios_preserved_total{handler="synth"} 512.0' in metrics
    assert 'luotrace_files_total{handler="synth",result="retrieved"} 1.0' in metrics
    assert 'luotrace_phase_duration_seconds_count{handler="synth",phase="synth_folios"} 4.0' in metrics
