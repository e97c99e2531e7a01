"""One writer per --out: `locked(out, command)` holds an advisory lock beside a local output while it is written.

The lock is a hidden file `.NAME.lock` next to the output `NAME`, locked with flock and holding the holder's
pid and command; it is removed when the holder ends (a holder killed with SIGKILL leaves the file, but the
kernel drops the flock, so the next run takes it). `tide harvest` and `tide train` hold it for the whole
time they write, so a second command writing into the same --out is refused at once instead of mixing its
writes into the first one's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tide.store.open import where

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second writer of one --out is then not stopped
    fcntl = None  # type: ignore[assignment]


class LockedError(ValueError):
    """Another tide command is writing the same --out: the message names it and what to do."""


def _holder(fd: int) -> str:
    """' (tide COMMAND, pid N)' from the lock file's contents, or '' when unreadable."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        words = os.read(fd, 64).decode(errors="replace").split()
    except OSError:
        return ""
    if not words or not words[0].isdigit():
        return ""
    command = f"tide {words[1]}" if len(words) > 1 else "tide command"
    return f"another {command} (pid {words[0]})"


def lock_path(out: Path) -> Path:
    """The lock file of the local output `out`."""
    return out.parent / f".{out.name}.lock"


@contextmanager
def locked(out: Path | str, command: str, resumes: bool = True) -> Iterator[None]:
    """Hold the lock of the local output `out` (its parent folder must exist) while the block runs; raise
    LockedError naming the holder when another process holds it. `command` names this one (harvest, train);
    `resumes`: the refusal says that running again resumes where the other one stopped.

    An object store (s3://, gs://) has no lock: two commands writing one URL at once are not stopped there.
    """
    if fcntl is None or not where(out).local:
        yield
        return
    out = Path(out)
    lock = lock_path(out)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another tide command"
            os.close(fd)
            then = (
                "run this command again: it resumes where that one stopped" if resumes else "run this again"
            )
            raise LockedError(
                f"{holder} is writing {out} (it holds the lock {lock}); wait for it to finish, or stop it and {then}"
            ) from None
        try:  # a holder removes the file when it ends: make sure the locked file is still the one at `lock`
            current = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: nobody can lock a file about to vanish
        os.close(fd)
