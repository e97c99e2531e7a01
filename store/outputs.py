"""What `--out` may be and what `--overwrite` may delete: one rule for every command.

tide deletes only files it wrote. Every output folder it writes keeps a manifest, `tide-manifest.json`
(store/manifest.py), naming its kind (a training run, a features report, a SAELens export, ...) and every file tide wrote there;
a store's manifest is its own metadata (store/store_files.py: its root zarr.json names every array, and
each array's zarr.json its chunk grid, so every key tide may have written is known exactly, locally and on
s3://). With `--overwrite` an earlier output is replaced only when every file in its folder is one of
those; anything else (a note in a subfolder, a folder with its own zarr.json, a link) refuses the
overwrite, naming the first such file, and nothing is deleted. Without `--overwrite` a folder holding
anything is refused. Every check comes before any deletion: harvest and train, whose outputs resume in
place, validate all their settings first and call `replace` last; every other command builds its output
in a hidden folder beside `--out` (`staged`) and swaps it in only when it has finished, so a run that fails
leaves the old output as it was.

Folders written before manifests existed are recognised by the exact files those versions wrote, never by
a pattern: a training run (train_config.json, metrics.jsonl, trainer_state.pt and the SAE folders whose
sae.json names them), an SAE folder, a SAELens export, a steer output and the demo model's pipeline. An old
splice, features or steer-demo folder, whose files depend on its contents, is refused: delete it by hand.

`local_out` is the opener of every `--out` that only a local folder or file can be (everything but a
harvest and `store card`): a path or a file:// URL passes, any other URL is refused in one line, so no
command ever writes a local folder named `s3:`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tide.store.failures import write_error
from tide.store.manifest import (
    LEGACY,
    MANIFEST,
    MARKERS,
    Kind,
    legacy_files,
    listing,
    read_manifest,
    write_manifest,
)
from tide.store.open import LocationError, is_url, where

WHAT = {
    "store": "a tide store",
    "run": "a tide training run",
    "sae": "a tide SAE folder",
    "export": "a SAELens export",
    "features": "a tide features report",
    "splice": "a tide splice output",
    "steer": "a tide steer output",
    "steer-demo": "a tide steering sweep",
    "demo-model": "a tide demo-model pipeline",
}

STAGED = frozenset(WHAT) - {"store", "run"}
"""The kinds `staged` builds beside --out; a store and a training run are written in place."""

STAGING_MARK = ".tide-staging"
"""First file of a staging folder: what makes a leftover one (from a killed run) recognisably tide's."""


class OutputError(ValueError):
    """An --out that tide must not write into or replace: the message names what is there."""


def local_out(value: str | Path, command: str, option: str = "--out ") -> Path:
    """The local path an --out of `tide COMMAND` names (a path, or a file:// URL); any other URL is refused
    with one line, before anything is written. `option` starts the message (a config's validator, whose
    errors name the option already, passes '')."""
    if not is_url(value):
        return Path(value)
    try:
        loc = where(value)
    except LocationError as e:
        raise OutputError(f"{option}{e}") from None
    if loc.local:
        return loc.path
    raise OutputError(
        f"{option}{value}: `tide {command}` writes a local folder or file, not a {loc.scheme}:// URL; write it "
        "to a local path, then copy it (e.g. `aws s3 cp --recursive`; only `tide harvest` and `tide store "
        "card` write to s3:// and gs:// themselves)"
    )


# --- what is in an output folder ---------------------------------------------------------------------------


def tide_files(out: Path, kind: Kind) -> tuple[list[str], list[str]]:
    """(the files of `out` tide wrote as output of `kind`, the others), relative and sorted. Raise
    OutputError when `out` is tide output of another kind, or an old output tide cannot tell apart."""
    ours = _rule(out, kind)
    if ours is None:
        _refuse_other_kind(out, kind)
        ours = set().__contains__
    everything = listing(out)
    links = {f for f in everything if (out / f).is_symlink()}  # tide never writes a link
    mine = [f for f in everything if f not in links and ours(f)]
    return mine, [f for f in everything if f in links or not ours(f)]


def _rule(out: Path, kind: Kind) -> Callable[[str], bool] | None:
    """Which files of `out` are tide's output of `kind`: its manifest (a store: its metadata), or the files an
    older tide wrote; None when `out` is no output of `kind`."""
    if kind == "store":
        from tide.store.store_files import store_rule

        return store_rule(out)
    found = read_manifest(out)
    if found is not None:
        return (found[1] | {MANIFEST}).__contains__ if found[0] == kind else None
    legacy = legacy_files(out, kind)
    return legacy.__contains__ if legacy is not None else None


def _refuse_other_kind(out: Path, kind: Kind) -> None:
    """Raise OutputError when `out` is tide output, but of another kind or too old to be replaced."""
    from tide.store.store_files import is_tide_store

    found = read_manifest(out)
    other = found[0] if found is not None else "store" if is_tide_store(out) else None
    other = other or next((k for k in LEGACY if k != kind and LEGACY[k](out) is not None), None)
    if other == kind:  # e.g. a store of a newer format version: which files are its own is not known here
        raise OutputError(
            f"--out {out} holds {WHAT[kind]} that this tide cannot read, so it cannot tell which files are its "
            "own; delete that folder by hand if you are sure, or choose another --out"
        )
    if other is not None:
        raise OutputError(
            f"--out {out} holds {WHAT.get(other, 'tide output')}, not {WHAT[kind]}; choose another --out, or "
            "delete that folder by hand if you are sure"
        )
    if kind in MARKERS and (out / MARKERS[kind]).is_file():
        raise OutputError(
            f"--out {out} holds {WHAT[kind]} written by an older tide, which kept no list of the files it "
            f"wrote ({MANIFEST}); tide will not guess which are its own: delete that folder by hand, or "
            "choose another --out"
        )


# --- the rule ----------------------------------------------------------------------------------------------


def _listing_text(names: list[str], shown: int = 3) -> str:
    head = ", ".join(names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_replaceable(out: Path, kind: Kind, overwrite: bool = True) -> list[str]:
    """The files of `out` that replacing it deletes (none when it is missing or empty); OutputError when it
    must not be replaced: a file or link, a folder that holds anything tide did not write as output of
    `kind` (named), or, without `overwrite`, an earlier output; for an output `staged` builds, also when it
    could not be written (check_writable), so that a command is refused before its work, not after."""
    if kind in STAGED:
        check_writable(out)
    if not out.exists() and not out.is_symlink():
        return []
    if not out.is_dir() or out.is_symlink():
        raise OutputError(
            f"--out {out} is {'a link' if out.is_symlink() else 'a file'}; give a folder path for {WHAT[kind]}"
        )
    ours, foreign = tide_files(out, kind)
    if foreign and not ours:
        entries = sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in out.iterdir())
        raise OutputError(
            f"--out {out} is not {WHAT[kind]}: it holds {_listing_text(entries)}. tide replaces only its own "
            "output, even with --overwrite; choose another --out, or delete that folder by hand if you are sure"
        )
    if foreign:
        raise OutputError(
            f"--out {out} holds {WHAT[kind]} but also {foreign[0]}"
            + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + ", which tide did not write; it deletes only the files it wrote, even with --overwrite. Move "
            "them out of the folder and run again, or choose another --out"
        )
    if ours and not overwrite:
        raise OutputError(
            f"--out {out} holds {WHAT[kind]}; pass --overwrite to replace it, or choose another --out"
        )
    return ours


def check_writable(out: Path) -> None:
    """Refuse, before any work, an --out that `staged` could not write: the folder its staging folder goes in
    (the nearest existing one above `out`) or the old output's own folder is read-only or not writable."""
    above = out.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    for folder in [above, *([out] if out.is_dir() else [])]:
        if not os.access(folder, os.W_OK | os.X_OK):
            code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
            raise OutputError(write_error(out, OSError(code, os.strerror(code), str(folder))))


def replace(out: Path, kind: Kind) -> None:
    """Delete the files of the output `out` after check_replaceable, and then the folders they leave empty;
    the folder itself, and anything else, stays."""
    removed = check_replaceable(out, kind)
    for rel in removed:
        (out / rel).unlink()
    prune(out, removed)


def prune(out: Path, removed: list[str]) -> None:
    """Remove the folders under `out` that held removed files and are empty now, deepest first (a folder
    someone made and left empty is no folder of tide's: it stays)."""
    folders = {p for rel in removed for p in Path(rel).parents if p != Path(".")}
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        try:
            (out / folder).rmdir()
        except OSError:  # not empty (or gone): it stays
            pass


@contextmanager
def staged(out: Path, kind: Kind, overwrite: bool) -> Iterator[Path]:
    """Build a new output of `kind` for `out`: check `out` first (check_replaceable), yield an empty hidden
    folder beside it to write into, and only when the block ends without error replace `out`'s old files
    with the new ones and write the manifest. On an error the old output is left as it was."""
    out = Path(out)
    check_replaceable(out, kind, overwrite)
    staging = out.parent / f".{out.name}.tide-new"
    try:
        _clear_staging(staging)
        staging.mkdir(parents=True)
        (staging / STAGING_MARK).touch()
        yield staging
        _swap(staging, out, kind, overwrite)
    except OSError as e:  # a read-only or full disk, a file in the way: one line naming --out
        raise OutputError(write_error(out, e)) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _clear_staging(staging: Path) -> None:
    """Remove a staging folder left by a killed run; refuse one that is not recognisably tide's."""
    if not (staging.exists() or staging.is_symlink()):
        return
    if staging.is_symlink() or not (staging / STAGING_MARK).is_file():
        raise OutputError(
            f"{staging} is in the way: tide writes a new output there before swapping it in, and this one is not "
            "tide's; move it away and run again"
        )
    shutil.rmtree(staging)


def _swap(staging: Path, out: Path, kind: Kind, overwrite: bool) -> None:
    """Move the finished output in `staging` into `out`, replacing the old output's files (checked again:
    the folder may have changed during the run)."""
    (staging / STAGING_MARK).unlink()
    new = set(listing(staging))
    try:
        old = check_replaceable(out, kind, overwrite)
    except OutputError as e:  # the run's work is kept: say where
        kept = out.parent / f"{out.name}.tide-new-output"
        staging.rename(kept)
        raise OutputError(f"{e} (the new output was kept in {kept})") from None
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, kind, set(old) | new)  # a kill mid-swap leaves every file of either listed
    gone = [rel for rel in old if rel not in new and rel != MANIFEST]
    for rel in gone:
        (out / rel).unlink()
    prune(out, gone)
    for rel in sorted(new):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    write_manifest(out, kind, new)


def nested(a: Path, b: Path) -> bool:
    """`a` and `b` are the same folder, or one lies inside the other (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_file(path: Path, tide_wrote: Callable[[str], bool], what: str) -> None:
    """An output that is one file (`store card --out`, `eval --json`): a missing file is written; an existing
    one is written over only when its text is one tide writes (`tide_wrote`, e.g. a dataset card), never a
    file of someone else's; a folder or link is refused."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise OutputError(
            f"{path} is {'a link' if path.is_symlink() else 'a folder'}; give the path of {what}"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        text = ""
    if not tide_wrote(text):
        raise OutputError(
            f"{path} exists and is not {what} tide wrote; it will not write over it: choose another path, or "
            "delete that file by hand if you are sure"
        )
