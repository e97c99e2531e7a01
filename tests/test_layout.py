"""The layout shows the data flow, harvest -> store -> train (issue 22): store/ imports neither harvest/ nor
train/, harvest/ never imports train/, and under train/ only train/loop/rerun.py imports harvest/ (the one
place that runs a store's model again). Imports are read with ast, so lazy imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = "train/loop/rerun.py"


def imported(path: Path) -> set[str]:
    """Every tide subpackage (`harvest`, `store`, `train`, ...) a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("tide.") and n.count(".") >= 1}
    return found


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_the_walk_reads_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import os\n\ndef f():\n    from tide.harvest.run import harvest\n    import tide.store.reader\n"
    )
    assert imported(module) == {"harvest", "store"}


@pytest.mark.parametrize("package, forbidden", [("store", {"harvest", "train"}), ("harvest", {"train"})])
def test_data_flows_one_way(package, forbidden):
    bad = {str(p.relative_to(REPO)): imported(p) & forbidden for p in modules(package)}
    assert not {p: b for p, b in bad.items() if b}, f"{package}/ must not import {forbidden}"


def test_only_rerun_imports_harvest_under_train():
    users = sorted(str(p.relative_to(REPO)) for p in modules("train") if "harvest" in imported(p))
    assert users == [ENTRY]
