"""`tide store pack`: a store as one zip file, its entries stored (not deflated), that zarr, xarray and tide
open directly (zarr.storage.ZipStore reads it; tide opens any path ending in .zip through store/open.py).

Chunks are compressed already; deflating them again would cost every reader time for almost no bytes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from tide.store.open import where, zarr_store
from tide.store.reader import StoreError, open_store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync


def pack(source: str | Path, out: Path) -> int:
    """Write every key of the tide store `source` (a folder or a URL) into the zip file `out`; returns the
    number of entries. `out` must end in .zip and not exist yet."""
    out = Path(out)
    if out.suffix != ".zip":
        raise StoreError(
            f"{out}: a packed store's name ends in .zip (e.g. {out.name}.zip), so that tide opens it"
        )
    if out.exists():
        raise StoreError(f"{out} already exists; delete it or choose another name")
    open_store(source)  # a tide store, else a clear error
    zstore = zarr_store(where(source))

    async def keys() -> list[str]:
        return sorted([k async for k in zstore.list()])

    names = sync(keys())
    tmp = out.with_name(out.name + ".partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for key in names:
                buf = sync(zstore.get(key, prototype=default_buffer_prototype()))
                if buf is not None:  # a key deleted while packing
                    z.writestr(key, buf.to_bytes())
        tmp.replace(out)  # a zip cut short by a kill never carries the final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(names)
