"""What `--overwrite` may delete: only a folder tide recognises as its own output, and only of the kind asked.

`tide harvest --out` replaces a tide store; `tide train --out` replaces a tide training run. Anything else
(an unrelated folder, a store where a run was asked for, or tide's output with foreign files inside) is
refused, naming what is there, and left for the user to delete by hand: a mistyped --out must never cost
someone their files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from tide.store.schema import FORMAT

Kind = Literal["store", "run"]

WHAT = {"store": "a tide store", "run": "a tide training run"}

RUN_FILES = frozenset(
    {
        "train_config.json",
        "metrics.jsonl",
        "trainer_state.pt",
        "trainer_state.pt.tmp",
        "train_config.json.tmp",
    }
)
"""Files `tide train` writes at the top of its --out (train/fit/checkpoint.py); SAE folders sit beside them."""

SAE_FILES = frozenset({"sae.json", "sae.safetensors", "eval.json"})
"""Files of one SAE folder (with their `.tmp` names while being replaced)."""


STORE_FILES = frozenset({"zarr.json", "README.md"})
"""Files at the top of a tide store: the root group's metadata and the dataset card (store/card.py)."""


class OutputError(ValueError):
    """An --out that tide must not write into or replace: the message names what is there."""


def is_tide_store(path: Path) -> bool:
    """A folder whose zarr.json carries tide's format attribute (any format version)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("attributes") or {}).get("format") == FORMAT


def _is_sae_folder(path: Path) -> bool:
    names = {p.name.removesuffix(".tmp") for p in path.iterdir()} if path.is_dir() else set()
    return bool(names) and names <= SAE_FILES


def is_training_run(path: Path) -> bool:
    """A folder with the files `tide train` writes first (train_config.json or trainer_state.pt)."""
    return (path / "train_config.json").is_file() or (path / "trainer_state.pt").is_file()


def kind_of(path: Path) -> Kind | None:
    if is_tide_store(path):
        return "store"
    if is_training_run(path):
        return "run"
    return None


def foreign_entries(path: Path, kind: Kind) -> list[str]:
    """Entries of `path` that tide did not write as part of output of this kind, sorted."""
    found = []
    for p in sorted(path.iterdir()):
        folder = p.is_dir() and not p.is_symlink()
        if folder and not any(p.iterdir()):
            continue  # an empty folder (a write killed just after making it): nothing to lose
        if kind == "store":
            # A tide store holds its root zarr.json (and zarr's temporary `.partial` files while one is being
            # replaced), its dataset card README.md, and one folder per array or group, nothing else.
            ours = (
                p.name in STORE_FILES
                or p.name.endswith(".partial")
                or (folder and (p / "zarr.json").is_file())
            )
        else:
            ours = p.name in RUN_FILES or (folder and _is_sae_folder(p))
        if not ours:
            found.append(p.name + ("/" if p.is_dir() else ""))
    return found


def _listing(names: list[str], shown: int = 4) -> str:
    head = ", ".join(names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_replaceable(out: Path, kind: Kind) -> None:
    """Raise OutputError unless `out` is missing, empty, or tide output of `kind` with nothing foreign in it."""
    if not out.exists():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputError(
            f"--out {out} is {'a link' if out.is_symlink() else 'a file'}; give a folder path for {WHAT[kind]}"
        )
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    if not entries:
        return
    found = kind_of(out)
    if found is None:
        raise OutputError(
            f"--out {out} is not {WHAT[kind]}: it holds {_listing(entries)}. tide replaces only its own output, "
            "even with --overwrite; choose another --out, or delete that folder by hand if you are sure"
        )
    if found != kind:
        raise OutputError(
            f"--out {out} holds {WHAT[found]}, not {WHAT[kind]}; choose another --out, or delete that folder "
            "by hand if you are sure"
        )
    foreign = foreign_entries(out, kind)
    if foreign:
        raise OutputError(
            f"--out {out} holds {WHAT[kind]} but also {_listing(foreign)}, which tide did not write; it will not "
            "delete them. Move them out of the folder (or delete it by hand) and run again, or choose another --out"
        )


def replace(out: Path, kind: Kind) -> None:
    """Empty `out` (the folder itself stays) after check_replaceable."""
    check_replaceable(out, kind)
    if not out.exists():
        return
    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def nested(a: Path, b: Path) -> bool:
    """`a` and `b` are the same folder, or one lies inside the other (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


# --- object stores (s3://, gs://): no folders, only keys ---------------------------------------------------


def remote_foreign(zstore: Any, names: list[str]) -> list[str]:
    """Top-level names of an object store that are not a tide store's: its files, or prefixes with a zarr.json."""
    from zarr.core.sync import sync

    found = []
    for name in names:
        if name in STORE_FILES or sync(zstore.exists(f"{name}/zarr.json")):
            continue
        found.append(name)
    return found


def replace_remote(zstore: Any) -> None:
    """Delete every key of a tide store (the caller has checked it is one, with nothing foreign)."""
    from zarr.core.sync import sync

    sync(zstore.clear())
