"""An OSError met while writing an output (a report, an export, a card, a zip), as one sentence that names
the output, the reason and the fix, so that a read-only disk, a file where a folder should be or a full disk
reads as such rather than as a traceback.

`with writing(out, SomeError):` around the code that writes `out` turns every OSError into SomeError(message).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_DENIED = {errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def write_error(out: Path | str, e: OSError, option: str = "--out") -> str:
    """Why writing `out` (given as `option`) failed, and what to do."""
    at = f" (at {e.filename})" if e.filename and str(e.filename) != str(out) else ""
    reason = e.strerror or str(e)
    if e.errno == errno.EROFS:
        return f"cannot write to {out}: the filesystem is read-only{at}. Choose {option} on a disk you can write to"
    if e.errno in _DENIED:
        return (
            f"cannot write to {out}: permission denied{at}. Choose {option} in a folder you can write to, or "
            "change the folder's permissions"
        )
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk holding {out} is full ({reason}{at}); free some space and run the command again"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot write to {out}: a file stands where a folder is needed{at}; choose another {option}"
    if e.errno == errno.EISDIR:
        return f"cannot write to {out}: it is a folder{at}; give {option} a file name"
    return f"writing {out} failed{at}: {reason} (errno {e.errno})"


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` (a writer thread, torch.save and others re-raise OS errors wrapped), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def writing(out: Path | str, error: type[Exception], option: str = "--out") -> Iterator[None]:
    """Turn an OSError raised inside into `error(write_error(...))`, chained to it."""
    try:
        yield
    except OSError as e:
        raise error(write_error(out, e, option)) from e
