"""Where a harvest writes: its --out folder, locked, inspected, then created, resumed or replaced.

`harvest()` inspects --out before writing anything (a new store, a resume of the same configuration, or a
replacement with --overwrite, which store/outputs.py allows only for a tide store), checks the disk, and
only then takes the lock and acts. While it writes, the lock of store/lock.py (a hidden `.NAME.lock`
beside the store) keeps a second harvest, or a `tide train`, from writing into the same --out. OS errors (a full disk, a read-only or forbidden folder) become messages that say
what happened and what to do.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import zarr
from tide.harvest.config import UNRECORDED, HarvestConfig
from tide.store.lock import LockedError
from tide.store.lock import locked as store_lock
from tide.store.manifest import listing
from tide.store.open import (
    LocationError,
    Where,
    bucket,
    bucket_exists,
    list_top,
    read_json,
    read_only,
    where,
    zarr_store,
)
from tide.store.outputs import check_replaceable, prune, replace
from tide.store.reader import StoreError, open_store
from tide.store.schema import FORMAT, StoreMeta
from tide.store.store_files import delete_keys, is_tide_store, remote_files, store_rule
from tide.store.writer import create_store


class HarvestError(ValueError):
    """Bad input to a harvest: the message says what and how to fix it."""


class Target(NamedTuple):
    """What a harvest will do with its --out."""

    meta: StoreMeta
    """The store's metadata: the existing store's when resuming (its creation time included)."""
    resume: bool
    """--out holds this configuration's store: keep its done samples."""
    replace: bool
    """--out holds a tide store that --overwrite replaces."""
    todo: list[int]
    """Sample chunks still to write."""


# Settings of how the bytes are kept, not of what they are: a resume keeps the store's (its arrays carry their
# codec chains), so a store harvested before the default codec changed resumes without naming its codec.
STORAGE_ONLY = frozenset({"codec"})


def differences(old: StoreMeta, new: StoreMeta) -> list[str]:
    """Fields that make two stores' contents differ."""
    diffs = []
    a, b = {**UNRECORDED, **old.harvest_config}, {**UNRECORDED, **new.harvest_config}
    for key in sorted(set(a) | set(b)):
        if key not in STORAGE_ONLY and a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} in the store, {b.get(key)!r} now")
    if old.model.transformer_config != new.model.transformer_config:
        diffs.append("model.transformer_config")
    elif old.model.fingerprint and new.model.fingerprint and old.model.fingerprint != new.model.fingerprint:
        diffs.append(
            f"model weights: fingerprint {old.model.fingerprint[:19]}... in the store, "
            f"{new.model.fingerprint[:19]}... now (the model folder holds other weights)"
        )
    if old.scheduler != new.scheduler:
        diffs.append("scheduler")
    return diffs


def _complete(root: zarr.Group, meta: StoreMeta) -> bool:
    """Every node create_store makes is there (a run killed while creating the store leaves some out)."""
    names = ["timesteps", "step_index", "seed", "done", *meta.act_names()]
    names += [f"stats/{n}/{s}" for n in meta.act_names() for s in ("count", "sum", "sumsq")]
    names += ["token_index"] if meta.tokens.subsampled else []
    try:
        for name in names:
            root[name]
    except KeyError:
        return False
    return True


def inspect_out(cfg: HarvestConfig, meta: StoreMeta) -> Target:
    """Decide, reading only, what the harvest does with cfg.out; raise HarvestError when it must not write."""
    out, every = cfg.out, list(range(meta.layout().num_sample_chunks))
    loc = writable_out(out)
    if not loc.local:
        return _inspect_remote(cfg, meta, loc)
    if out.exists() and (not out.is_dir() or out.is_symlink()):
        raise HarvestError(f"--out {out} is a file; give a folder path for the Zarr store")
    if not out.exists() or not listing(out):
        return Target(meta, resume=False, replace=False, todo=every)
    if not is_tide_store(out):
        check_replaceable(out, "store")  # raises, naming what the folder holds
    return _inspect_store(cfg, meta, lambda: check_replaceable(out, "store"))


def writable_out(out: Path | str) -> Where:
    """--out classified; a read-only location (http, zip, hf) or an unknown scheme is refused here."""
    try:
        loc = where(out)
    except LocationError as e:
        raise HarvestError(f"--out {e}") from None
    if not loc.writable:
        raise HarvestError(f"--out {read_only(loc)}")
    return loc


def _inspect_remote(cfg: HarvestConfig, meta: StoreMeta, loc: Where) -> Target:
    """inspect_out for an object store: a missing or empty prefix is new; only a tide store (recognised by its
    zarr.json) with nothing else under it is resumed or replaced."""
    every = list(range(meta.layout().num_sample_chunks))
    try:
        zstore = zarr_store(loc, "w")
        doc = read_json(zstore, loc)
        if doc is None and not bucket_exists(zstore, loc):
            raise LocationError(
                f"{loc.text}: the bucket {bucket(loc)!r} does not exist; create it or fix the URL"
            )
        names = list_top(zstore)
    except LocationError as e:
        raise HarvestError(str(e)) from e.__cause__

    def refuse_foreign() -> None:
        _, _, foreign = remote_files(zstore)  # listed again: the prefix may have changed meanwhile
        if foreign:
            raise HarvestError(
                f"--out {loc.text} holds a tide store but also {foreign[0]}"
                + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
                + ", which tide did not write; it deletes only the keys it wrote, even with --overwrite: move "
                "them away, or choose another --out"
            )

    if doc is None:
        if not names:
            return Target(meta, resume=False, replace=False, todo=every)
        raise HarvestError(
            f"--out {loc.text} is not a tide store: it holds {', '.join(names[:4])} but no zarr.json; tide replaces "
            "only its own stores, even with --overwrite: choose another --out"
        )
    if (doc.get("attributes") or {}).get("format") != FORMAT:
        raise HarvestError(
            f"--out {loc.text} is a Zarr store but not a tide store; tide replaces only its own stores, even with "
            "--overwrite: choose another --out"
        )
    return _inspect_store(cfg, meta, refuse_foreign)


def _inspect_store(cfg: HarvestConfig, meta: StoreMeta, replaceable) -> Target:
    """inspect_out for an --out holding a tide store: resume it, or replace it (`replaceable()` raises when the
    store may not be replaced) with --overwrite."""
    out, every = cfg.out, list(range(meta.layout().num_sample_chunks))
    try:
        old = open_store(out)
    except StoreError as e:
        if not cfg.overwrite:
            raise HarvestError(
                f"--out {out} holds a tide store this tide cannot resume ({e}); pass --overwrite to replace "
                "it, or choose another --out"
            ) from None
    else:
        diffs = differences(old.meta, meta)
        if not diffs:
            if not _complete(old.root, old.meta):  # its creation was cut short: no sample is in it
                replaceable()
                return Target(meta, resume=False, replace=True, todo=every)
            done, lay = old.done(), old.layout
            todo = [c for c in every if not done[lay.sample_chunk(c)].all()]
            return Target(old.meta, resume=True, replace=False, todo=todo)
        if not cfg.overwrite:
            raise HarvestError(
                f"--out {out} holds a store made with a different configuration:\n  "
                + "\n  ".join(diffs)
                + "\nPass --overwrite to replace it, or choose another --out."
            )
    replaceable()  # only a tide store, with nothing else in its folder, is replaced
    return Target(meta, resume=False, replace=True, todo=every)


@contextmanager
def locked(out: Path | str) -> Iterator[None]:
    """Hold the harvest lock of `out` (store/lock.py) for the block; HarvestError while another command holds it."""
    try:
        with store_lock(out, "harvest"):
            yield
    except LockedError as e:
        raise HarvestError(str(e)) from None


def open_target(
    cfg: HarvestConfig, target: Target, arrays: dict[str, Any], log
) -> tuple[zarr.Group, StoreMeta]:
    """The open store to write into: resumed, or (re)created; a creation that fails leaves no store behind."""
    out, loc = cfg.out, where(cfg.out)
    if target.resume:
        return zarr.open_group(zarr_store(loc, "w"), mode="r+", zarr_format=3), target.meta
    if target.replace:
        log(f"overwriting {out}")
        _discard(cfg, refuse=True)
    existed = loc.local and out.exists()
    shape = None
    if cfg.save_images:
        c, h, w = arrays["image_shape"]
        shape = (h, w, c)
    try:
        root = create_store(
            out,
            target.meta,
            arrays["timesteps"],
            arrays["seeds"],
            arrays["labels"],
            arrays["prompt_index"],
            shape,
        )
    except BaseException:
        _discard(cfg, refuse=False)  # a half-made store holds no sample: nothing of it is worth keeping
        if loc.local and not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return root, target.meta


def _discard(cfg: HarvestConfig, refuse: bool) -> None:
    """Delete the files (keys) of the tide store at cfg.out that it wrote itself (store/store_files.py), and
    nothing else: with `refuse`, anything else there is refused first (OutputError); without, it stays."""
    loc = where(cfg.out)
    if loc.local:
        if refuse:
            replace(cfg.out, "store")
        else:
            rule = store_rule(cfg.out)
            ours = [f for f in listing(cfg.out) if rule is not None and rule(f)] if cfg.out.is_dir() else []
            for rel in ours:
                (cfg.out / rel).unlink()
            prune(cfg.out, ours)
        return
    zstore = zarr_store(loc, "w")
    _, ours, foreign = remote_files(zstore)
    if refuse and foreign:
        raise HarvestError(
            f"--out {loc.text} holds {foreign[0]}, which tide did not write; it will not delete it"
        )
    delete_keys(zstore, ours)


def write_failure(
    out: Path | str, e: OSError, total: int, done: int | None = None, creating: bool = False
) -> HarvestError:
    """A one-paragraph error for an OSError met while creating (`creating`) or filling the store at `out` (a
    folder or a URL); `done` is how many of its `total` samples are complete, when known."""
    where = e.filename or out
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        if creating:
            return HarvestError(
                f"the disk holding {out} filled up while the store was being created ({reason}); nothing was "
                "kept. Free some space (or choose an --out on another disk) and run the command again"
            )
        kept = (
            f"{done} of {total} samples had been written completely"
            if done is not None
            else "the samples done so far are kept"
        )
        return HarvestError(
            f"the disk holding {out} is full ({reason}): {kept}. The store is resumable: free some space and "
            "run the same command again; it keeps the done samples and writes the rest"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the filesystem is read-only" if e.errno == errno.EROFS else "permission denied"
        at = f" (at {e.filename})" if e.filename and Path(e.filename) != out else ""
        return HarvestError(
            f"cannot write to {out}: {why}{at}. Choose an --out in a folder you can write to, or change the "
            "folder's permissions"
        )
    return HarvestError(f"writing the store at {out} failed at {where}: {reason} (errno {e.errno})")
