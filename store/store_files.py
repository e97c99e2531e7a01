"""Which files of a folder (or keys of an object store) a tide store wrote: a store's manifest is its metadata.

The root zarr.json's attributes (StoreMeta) name every array and group the harvest creates, and each
array's zarr.json its chunk grid, so the keys tide may have written are known exactly:

    zarr.json, README.md                       the root group and the dataset card (store/card.py)
    NODE/zarr.json                             each array and group StoreMeta implies (and nothing else)
    ARRAY/c/i/j/...                            a chunk of ARRAY inside its grid, one index per dimension
    ...NAME.<32 hex digits>.partial            zarr's temporary file for one of those, left by a kill

Anything else is not tide's: a note in an array's folder, a chunk index outside the grid, a folder of
someone's own with a zarr.json, a link. This holds for every format version (the arrays are the same; the
metadata says which are there), so `tide harvest --overwrite` replaces an older store by the same rule.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tide.store.schema import FORMAT, StoreMeta

_PARTIAL = re.compile(r"(.+)\.[0-9a-f]{32}\.partial")
"""zarr's LocalStore writes `path.with_suffix('.<uuid hex>.partial')` and renames it over `path`."""


def is_tide_store(path: Path) -> bool:
    """A folder whose zarr.json carries tide's format attribute (any format version)."""
    doc = _read_local(path)("zarr.json")
    return doc is not None and (doc.get("attributes") or {}).get("format") == FORMAT


def _read_local(root: Path) -> Callable[[str], dict[str, Any] | None]:
    def read(key: str) -> dict[str, Any] | None:
        try:
            doc = json.loads((root / key).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    return read


def store_rule(out: Path) -> Callable[[str], bool] | None:
    """Whether a file of the local folder `out` (relative path) is one its tide store wrote; None when `out`
    holds no tide store whose metadata this tide reads."""
    return rule_from(_read_local(out))


def rule_from(read: Callable[[str], dict[str, Any] | None]) -> Callable[[str], bool] | None:
    """store_rule over any store: `read(key)` gives the JSON document at `key`, None when absent."""
    root = read("zarr.json")
    attrs = (root or {}).get("attributes") or {}
    if attrs.get("format") != FORMAT:
        return None
    try:
        meta = StoreMeta.model_validate(attrs)
    except ValueError:
        return None
    arrays = _arrays(meta)
    groups = {"", "stats", *(f"stats/{n}" for n in meta.act_names())}
    grids = {name: _grid(read(f"{name}/zarr.json")) for name in arrays}

    def ours(rel: str) -> bool:
        if rel in ("zarr.json", "README.md"):
            return True
        parts = rel.split("/")
        for k in range(len(parts) - 1, -1, -1):
            node, rest = "/".join(parts[:k]), parts[k:]
            if node in groups or node in arrays:
                break
        else:
            return False
        if len(rest) == 1 and (rest[0] == "zarr.json" or _partial_of(rest[0]) == "zarr"):
            return True
        if node == "" and len(rest) == 1 and _partial_of(rest[0]) == "README":
            return True
        return node in arrays and _chunk(rest, grids[node])

    return ours


def _arrays(meta: StoreMeta) -> set[str]:
    """Every array a harvest of `meta` creates."""
    names = {"timesteps", "step_index", "seed", "done", *meta.act_names()}
    names |= (
        {"label"}
        if meta.conditioning == "class"
        else {"prompt_index"}
        if meta.conditioning == "prompt"
        else set()
    )
    names |= {"token_index"} if meta.tokens.subsampled else set()
    names |= {"images"} if meta.harvest_config.get("save_images") else set()
    names |= {f"stats/{n}/{s}" for n in meta.act_names() for s in ("count", "sum", "sumsq")}
    return names


def _grid(doc: dict[str, Any] | None) -> tuple[int, ...] | None:
    """Chunks along each dimension of an array from its zarr.json (default '/' chunk keys only), or None."""
    try:
        encoding = doc["chunk_key_encoding"]
        if (
            encoding["name"] != "default"
            or (encoding.get("configuration") or {}).get("separator", "/") != "/"
        ):
            return None
        shape, chunks = doc["shape"], doc["chunk_grid"]["configuration"]["chunk_shape"]
        return tuple(-(-int(n) // int(c)) for n, c in zip(shape, chunks, strict=True))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _partial_of(name: str) -> str | None:
    m = _PARTIAL.fullmatch(name)
    return m.group(1) if m else None


def _chunk(rest: list[str], grid: tuple[int, ...] | None) -> bool:
    """`c/i/j/...` (or zarr's temporary file of it) names a chunk inside `grid`."""
    if grid is None or len(rest) != len(grid) + 1 or rest[0] != "c":
        return False
    last = _partial_of(rest[-1]) or rest[-1]
    indices = [*rest[1:-1], last]
    return all(i.isdigit() and str(int(i)) == i and int(i) < n for i, n in zip(indices, grid, strict=True))


# --- object stores (s3://, gs://): the same rule over keys -------------------------------------------------


def remote_files(zstore: Any) -> tuple[bool, list[str], list[str]]:
    """(whether the object store's prefix holds a tide store, its keys that store wrote, the others), sorted."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def keys() -> list[str]:
        return sorted([k async for k in zstore.list()])

    def read(key: str) -> dict[str, Any] | None:
        buf = sync(zstore.get(key, prototype=default_buffer_prototype()))
        try:
            doc = json.loads(buf.to_bytes()) if buf is not None else None
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    every = sync(keys())
    ours = rule_from(read)
    if ours is None:
        return False, [], every
    return True, [k for k in every if ours(k)], [k for k in every if not ours(k)]


def delete_keys(zstore: Any, keys: list[str]) -> None:
    """Delete `keys` of zarr's obstore-backed store (obstore batches them: one request per thousand on S3)."""
    import obstore

    if keys:
        obstore.delete(zstore.store, keys)
