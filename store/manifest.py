"""The manifest every output folder of tide's keeps (`tide-manifest.json`: its kind and every file tide wrote
there), and the exact files older versions, which kept none, wrote: what store/outputs.py's rule reads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

Kind = Literal["store", "run", "sae", "export", "features", "splice", "steer", "steer-demo", "demo-model"]

MANIFEST = "tide-manifest.json"
MANIFEST_FORMAT = "tide.output"

# --- the manifest ------------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> tuple[str, set[str]] | None:
    """(kind, files) of the manifest in `folder`, or None when it has none (or none tide can read)."""
    try:
        doc = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not (
        isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT and isinstance(doc.get("files"), list)
    ):
        return None
    return str(doc.get("kind")), {f for f in doc["files"] if isinstance(f, str) and _inside(f)}


def _inside(rel: str) -> bool:
    """A manifest entry names a file inside its folder: relative, with no `..`, `.` or empty part."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def write_manifest(folder: Path, kind: Kind, files: set[str]) -> None:
    """Write (atomically) the manifest of `folder`: its kind and every file tide wrote there."""
    doc = {"format": MANIFEST_FORMAT, "kind": kind, "files": sorted(files - {MANIFEST})}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def record(folder: Path, kind: Kind, files: list[str]) -> None:
    """Add `files` (paths relative to `folder`) to its manifest before they are written, so that a kill at any
    instant leaves nothing of tide's unlisted. A folder without a manifest (made by an older tide) gets one
    that also lists the files that version wrote there."""
    found = read_manifest(folder)
    known = found[1] if found else set(legacy_files(folder, kind) or ())
    if not set(files) <= known:
        write_manifest(folder, kind, known | set(files))


def record_file(path: Path) -> None:
    """List `path` (about to be written, atomically: with its `.tmp` name) in the manifest of the output
    holding it, its folder's or its parent's (an eval.json in an SAE folder of a training run); nothing when
    neither has one (an older output recognises such files by their names)."""
    for folder in (path.parent, path.parent.parent):
        found = read_manifest(folder)
        if found is not None:
            rel = path.relative_to(folder).as_posix()
            record(folder, found[0], [rel, rel + ".tmp"])  # type: ignore[arg-type]
            return


def listing(out: Path) -> list[str]:
    """Every file under `out` (links, and links to folders, count as files; folders do not), relative, sorted."""
    found = []
    for folder, dirs, files in os.walk(out):
        base = Path(folder).relative_to(out)
        found += [(base / d).as_posix() for d in dirs if (Path(folder) / d).is_symlink()]
        found += [(base / f).as_posix() for f in files]
    return sorted(found)


# --- outputs written before the manifest: the exact files those versions wrote -------------------------------

MARKERS = {"features": "features.json", "splice": "report.json", "steer-demo": "sweep.json"}
"""The file that made an older output of these kinds one (it cannot be replaced without its manifest)."""

RUN_FILES = ("train_config.json", "metrics.jsonl", "trainer_state.pt")
SAE_FILES = ("sae.json", "sae.safetensors", "eval.json")
_EVAL = re.compile(r"eval_b[1-9][0-9]*\.json")  # `tide eval --buckets N`'s file
STEER_FILES = ("images.npy", "unsteered.npy", "labels.npy", "seeds.npy", "grid.png", "steer.json")
DEMO_FILES = (
    "model_index.json",
    "README.md",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
)


def _with_tmp(names) -> set[str]:
    """Names and the `.tmp` names tide's atomic writes give them on the way."""
    return set(names) | {n + ".tmp" for n in names}


def _sae_folder_files(folder: Path, prefix: str = "") -> set[str] | None:
    """The files tide writes in an SAE folder (present ones only), if its sae.json is tide's and names it."""
    try:
        meta = json.loads((folder / "sae.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(meta, dict) and meta.get("format") == "tide.sae" and meta.get("name") == folder.name):
        return None
    names = _with_tmp(SAE_FILES) | {p.name for p in folder.iterdir() if _EVAL.fullmatch(p.name)}
    return {prefix + n for n in names}


def _run_files(out: Path) -> set[str] | None:
    if not ((out / "train_config.json").is_file() or (out / "trainer_state.pt").is_file()):
        return None
    found = _with_tmp(RUN_FILES)
    for sub in out.iterdir():
        if sub.is_dir() and not sub.is_symlink():
            found |= _sae_folder_files(sub, sub.name + "/") or set()
    return found


def _fixed(marker: str, names: tuple[str, ...]) -> Callable[[Path], set[str] | None]:
    return lambda out: set(names) if (out / marker).is_file() else None


def _demo_files(out: Path) -> set[str] | None:
    try:
        index = json.loads((out / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return set(DEMO_FILES) if isinstance(index, dict) and "tide_default_guidance_scale" in index else None


LEGACY: dict[str, Callable[[Path], set[str] | None]] = {
    "run": _run_files,
    "sae": _sae_folder_files,
    "export": lambda out: {"cfg.json", "sae_weights.safetensors"} if (out / "cfg.json").is_file() else None,
    "steer": _fixed("steer.json", STEER_FILES),
    "demo-model": _demo_files,
}


def legacy_files(out: Path, kind: Kind) -> set[str] | None:
    """The files tide's versions before the manifest wrote in an output of `kind`; None when `out` is not one."""
    if not out.is_dir():
        return None
    rule = LEGACY.get(kind)
    return rule(out) if rule is not None else None
