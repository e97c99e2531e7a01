"""`tide store pack`: a store as one zip file, its entries stored (not deflated), that zarr, xarray and tide
open directly (zarr.storage.ZipStore reads it; tide opens any path ending in .zip through store/open.py).

Chunks are compressed already; deflating them again would cost every reader time for almost no bytes. With
`codec`, the data arrays (activations, token_index) are recompressed on the way into the zip: a store
harvested with the default codec (none, for training reads at raw speed) is shared smaller as blosc-zstd,
and reads back bitwise the same.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import zarr
from tide.store.card import card_text
from tide.store.open import where, zarr_store
from tide.store.outputs import local_out
from tide.store.reader import Store, StoreError, checksummed, open_store, read_into
from tide.store.schema import CODECS, chunk_region
from tide.store.writer import WRITE_EVERY_CHUNK, _compressor, compressors
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync


def unsafe_names(names: list[str]) -> list[str]:
    """The keys (zip entry names) that would land outside the store's folder when unzipped or copied: absolute
    ones, and those with a '..' part. No tide store has one; a zip edited by hand or by an attacker may."""
    outside = re.compile(r"^([/\\]|[A-Za-z]:)|(^|[/\\])\.\.([/\\]|$)")  # /x, C:x, ../x, a/../../x
    return [n for n in names if outside.search(n)]


def unsafe_entries(path: str | Path) -> list[str]:
    """A packed store's entries named outside the store, each as a problem `tide store verify` reports; none
    for a store that is not a .zip."""
    loc = where(path)
    if loc.scheme != "zip":
        return []
    with zipfile.ZipFile(loc.path) as z:
        names = z.namelist()
    return [
        f"entry {n!r} of {loc.text} is named outside the store: unzipping would write it outside the folder; "
        "delete it (e.g. `zip -d`) or pack the store again from a clean copy"
        for n in unsafe_names(names)
    ]


def pack(source: str | Path, out: str | Path, codec: str | None = None) -> int:
    """Write every key of the tide store `source` (a folder or a URL) into the zip file `out`, the data arrays
    recompressed with `codec` when it is given and is not the store's; returns the number of entries. `out`
    must end in .zip and not exist yet."""
    out = local_out(out, "store pack")  # a local file: a URL is refused here, before anything is read
    if out.suffix != ".zip":
        raise StoreError(
            f"{out}: a packed store's name ends in .zip (e.g. {out.name}.zip), so that tide opens it"
        )
    if out.exists():
        raise StoreError(f"{out} already exists; delete it or choose another name")
    if codec is not None and codec not in CODECS:
        raise StoreError(f"--codec {codec!r} is unknown; choose one of {', '.join(CODECS)}")
    store = open_store(source)  # a tide store, else a clear error
    zstore = zarr_store(where(source))

    async def keys() -> list[str]:
        return sorted([k async for k in zstore.list()])

    names = sync(keys())
    _refuse_unsafe(source, names)
    recoded = _data_arrays(store) if codec not in (None, store.meta.codec) else []
    tmp = out.with_name(out.name + ".partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for key in names:
                if recoded and (key in ("zarr.json", "README.md") or key.split("/")[0] in recoded):
                    continue  # written below, recompressed or describing the new codec
                buf = sync(zstore.get(key, prototype=default_buffer_prototype()))
                if buf is not None:  # a key deleted while packing
                    z.writestr(key, buf.to_bytes())
            if recoded:
                root = sync(zstore.get("zarr.json", prototype=default_buffer_prototype())).to_bytes()
                _recompress_into(z, store, root, recoded, codec, set(names))
        tmp.replace(out)  # a zip cut short by a kill never carries the final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(names)


def _refuse_unsafe(source: str | Path, names: list[str]) -> None:
    """Refuse to pack keys that unzipping the new zip would write outside its folder (a hand-edited source)."""
    unsafe = unsafe_names(names)
    if unsafe:
        raise StoreError(
            f"{source} holds {len(unsafe)} entr{'y' if len(unsafe) == 1 else 'ies'} named outside the store "
            f"({', '.join(repr(n) for n in unsafe[:3])}{', ...' if len(unsafe) > 3 else ''}), which unzipping the "
            "new zip would write outside its folder; nothing was written. Delete them from the source (e.g. "
            "`zip -d`) or pack a clean copy of the store"
        )


def _data_arrays(store: Store) -> list[str]:
    """The arrays whose chunks the store's codec compresses."""
    return [*store.meta.act_names(), *(["token_index"] if "token_index" in store.root else [])]


def _recompress_into(
    z: zipfile.ZipFile, store: Store, root_json: bytes, arrays: list[str], codec: str, present: set[str]
) -> None:
    """The data arrays re-encoded with `codec` (each chunk read, its checksum verified, and written again), the
    root metadata naming the new codec, and the dataset card (if the store had one) saying so."""
    for name in arrays:
        _recompress_array(z, store.root[name], codec, present)
    root = json.loads(root_json)
    root["attributes"]["codec"] = codec
    z.writestr("zarr.json", json.dumps(root, indent=2))
    if "README.md" in present:
        meta = store.meta.model_copy(update={"codec": codec})
        z.writestr("README.md", card_text(Store(path=store.path, root=store.root, meta=meta)))


def _recompress_array(z: zipfile.ZipFile, arr: zarr.Array, codec: str, present: set[str]) -> None:
    """Array `arr` into the zip with `codec`: zarr encodes each chunk into a memory store, whence it is moved to
    the zip; chunks the source lacks stay absent. A version-1 array stays without checksums."""
    itemsize = np.dtype(arr.dtype).itemsize
    chain = compressors(codec, itemsize) if checksummed(arr) else _compressor(codec, itemsize)
    mem = zarr.storage.MemoryStore()
    dst = zarr.create_array(
        mem, name=arr.path, shape=arr.shape, dtype=arr.dtype, chunks=arr.chunks,
        fill_value=arr.metadata.fill_value, compressors=chain, attributes=dict(arr.attrs),
        dimension_names=arr.metadata.dimension_names, config=WRITE_EVERY_CHUNK,
    )  # fmt: skip
    for coords in np.ndindex(*arr.cdata_shape):
        key = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
        if key not in present:
            continue
        region = chunk_region(coords, arr.shape, arr.chunks)
        values = np.empty(tuple(s.stop - s.start for s in region), arr.dtype)
        read_into(arr, region, values)  # a damaged chunk stops the pack, naming its file
        dst[region] = values
        z.writestr(key, _take(mem, key))
    z.writestr(f"{arr.path}/zarr.json", _take(mem, f"{arr.path}/zarr.json"))


def _take(mem: zarr.storage.MemoryStore, key: str) -> bytes:
    """A key's bytes out of a memory store, deleting it (a store's worth of chunks never sits in memory)."""
    data = sync(mem.get(key, prototype=default_buffer_prototype())).to_bytes()
    sync(mem.delete(key))
    return data
