"""The installed distribution is one `tide` namespace: no top-level `train`, `store`, `harvest` or `cli`."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"harvest", "store", "train", "cli"}


def test_no_source_file_imports_a_bare_package_name():
    """In an installed tide only `tide.train` exists, so `from train...` would work in the repo and fail for users."""
    bare = []
    for path in sorted(ROOT.glob("**/*.py")):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bare += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PACKAGES
            ]
    assert not bare, bare


def test_the_wheel_holds_only_the_tide_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tide-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"tide", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for module in ("tide/cli.py", "tide/harvest/run.py", "tide/store/reader.py", "tide/train/fit/trainer.py"):
        assert module in names
    assert "tide/harvest/demo/digits-dit/model_index.json" in names  # the shipped model travels with it
    assert "tide/train/analysis/templates/index.html" in names  # the templates of `tide features`
    assert not any(n.startswith("tide/tests/") for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tide = tide.cli:app" in entry
