"""The installed distribution, tide-sae, is one `tide` namespace (no top-level `train`, `store`, `harvest` or
`cli`), and building it prints no packaging warning."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from tide.store.card import CARD

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


def _source_copy(tmp_path: Path) -> Path:
    """The files a fresh clone has (git's tracked and unignored files), so the build sees no local leftovers
    (build/, *.egg-info) and leaves none in the repository."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    src = tmp_path / "src"
    for name in listed:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    return src


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The wheel `pip install .` would build, from a copy of the source, and pip's verbose build log."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp)
    log = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (wheel,) = tmp.glob("*.whl")
    return wheel, log.stdout + log.stderr


def test_the_build_prints_no_packaging_warning(built):
    """setuptools warns (about 100 lines) for a deprecated license table or a data folder missing from
    `packages`; pip shows them with -v, and a user sees them on any build that fails."""
    _, log = built
    warnings = [line for line in log.splitlines() if re.search(r"Warning|deprecated|absent from", line)]
    assert not warnings, "\n".join(warnings)


def test_the_distribution_is_tide_sae():
    """`tide` on PyPI is another project: the distribution is tide-sae, the import package and command tide."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "tide-sae"
    assert project["scripts"] == {"tide": "tide.cli:app"}
    assert "pip install tide-sae" in CARD  # the dataset card tells its readers the same name


def test_the_wheel_holds_only_the_tide_namespace(built):
    wheel, _ = built
    assert wheel.name.startswith("tide_sae-"), wheel.name
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
