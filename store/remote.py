"""Reading a remote store's chunks without paying a round trip each: the training loader's requests, all of a
window's at once (`fetch_ahead`), and `tide store verify --quick`'s sizes from a listing and frame headers by
byte range (`listed_sizes`, `RangeFile`), so that checking a remote store downloads no chunk."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import zarr
from tide.store.reader import _direct_codec, _store_root

# Requests a remote store keeps in flight while the loader reads a window: each costs a round trip, so one
# per decoding thread leaves the link idle between them; 32 keeps an S3 endpoint busy without crowding it.
IN_FLIGHT = 32


@dataclass(frozen=True)
class Fetches:
    """Chunk requests started by `fetch_ahead`: `fetches[i]` is a future of read i's chunk bytes (None where the
    read goes to the store as it happens); `cancel()` drops the requests not yet answered."""

    futures: list[Future | None]
    task: Future | None = None

    def __getitem__(self, i: int) -> Future | None:
        return self.futures[i]

    def cancel(self) -> None:
        # The futures first: cancelling the task settles every pending future with CancelledError on the
        # event loop's thread, and a settled future can no longer be cancelled, so the other order races.
        for f in self.futures:
            if f is not None:
                f.cancel()
        if self.task is not None:
            self.task.cancel()


def fetch_ahead(
    arr: zarr.Array, selections: Sequence[tuple[slice, ...]], in_flight: int = IN_FLIGHT
) -> Fetches:
    """Start fetching the chunk files that `selections` (each inside one chunk) read, all at once with up to
    `in_flight` GET requests in flight on zarr's event loop; hand `fetches[i]` to `read_into`. For a local
    folder or zip, where a read costs no round trip, and for selections spanning chunks, the entries are
    None and `read_into` reads as before.
    """
    from zarr.storage import ZipStore

    if _store_root(arr) is not None or isinstance(arr.store, ZipStore) or _direct_codec(arr) is False:
        return Fetches([None] * len(selections))
    keys = [_one_chunk_key(arr, sel) for sel in selections]
    futures: list[Future | None] = [Future() if k is not None else None for k in keys]

    async def fetch_all() -> None:
        from zarr.core.buffer import default_buffer_prototype

        gate = asyncio.Semaphore(in_flight)

        async def one(key: str, fut: Future) -> None:
            try:
                async with gate:
                    if fut.cancelled():
                        return
                    buf = await arr.store.get(key, prototype=default_buffer_prototype())
                _settle(fut, None if buf is None else buf.as_numpy_array())
            except BaseException as e:  # handed to the reader that waits on it
                _settle(fut, error=e)
                if isinstance(e, asyncio.CancelledError):
                    raise

        await asyncio.gather(*(one(k, f) for k, f in zip(keys, futures, strict=True) if f is not None))

    from zarr.core.sync import _get_loop

    return Fetches(futures, asyncio.run_coroutine_threadsafe(fetch_all(), _get_loop()))


def _settle(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Give `fut` its result or error, unless it was cancelled meanwhile (from another thread)."""
    with suppress(InvalidStateError):
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)


def _one_chunk_key(arr: zarr.Array, selection: tuple[slice, ...]) -> str | None:
    """The store key of the one chunk a selection lies in, or None when it spans chunks."""
    shape = arr.metadata.chunk_grid.chunk_shape
    selection = tuple(slice(*s.indices(n)) for s, n in zip(selection, arr.shape, strict=True))
    coords = tuple(s.start // c for s, c in zip(selection, shape, strict=True))
    if any(
        s.step != 1 or s.stop <= s.start or (s.stop - 1) // c != i
        for s, c, i in zip(selection, shape, coords, strict=True)
    ):
        return None
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.path}/{key}" if arr.path else key


def listed_sizes(arr: zarr.Array) -> dict[str, int] | None:
    """{key: size} of the array's chunk files from one listing of an object store (a page per thousand
    chunks, instead of a request per chunk); None for other stores."""
    from zarr.storage import ObjectStore

    if not isinstance(arr.store, ObjectStore):
        return None
    import obstore
    from zarr.core.sync import sync

    async def listing() -> dict[str, int]:
        return {
            m["path"]: m["size"]
            async for page in obstore.list(arr.store.store, prefix=f"{arr.path}/")
            for m in page
        }

    return sync(listing())


def key_size(zstore: Any, key: str) -> int | None:
    """A key's size from the store's metadata (a HEAD request over http), None when it is not there."""
    from zarr.core.sync import sync

    try:
        return sync(zstore.getsize(key))
    except (FileNotFoundError, KeyError):
        return None


class RangeFile:
    """The read/seek of a file over a store key, each read one byte-range request."""

    def __init__(self, zstore: Any, key: str, size: int):
        self.zstore, self.key, self.size, self.pos = zstore, key, size, 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        from zarr.abc.store import RangeByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        end = min(self.pos + n, self.size)
        if end <= self.pos:
            return b""
        request = RangeByteRequest(self.pos, end)
        buf = sync(self.zstore.get(self.key, prototype=default_buffer_prototype(), byte_range=request))
        if buf is None:
            raise FileNotFoundError(self.key)
        data = buf.to_bytes()
        self.pos += len(data)
        return data
