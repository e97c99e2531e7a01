"""Open a tide store and read its metadata, completion state and statistics."""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import crc32c
import numpy as np
import zarr
from pydantic import ValidationError
from tide.store.open import LocationError, Where, bucket, bucket_exists, read_json, where, zarr_store
from tide.store.schema import (
    ACT_DIMS,
    CHECKSUM_BYTES,
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    Layout,
    StoreMeta,
    chunk_region,
    chunks_touched,
)


class StoreError(ValueError):
    """A path that is not a readable tide store, or a store that fails a check."""


class StepStats(NamedTuple):
    """Per-step statistics of one activation array, over done samples."""

    count: np.ndarray
    """(S,) rows summed."""
    mean: np.ndarray
    """(S, D) per-channel mean."""
    var: np.ndarray
    """(S, D) per-channel variance."""
    mean_sq_norm: np.ndarray
    """(S,) mean squared L2 norm of a row."""


@dataclass
class Store:
    """An open tide store."""

    path: Path | str
    """The folder or .zip file, or the URL of a remote store."""
    root: zarr.Group
    meta: StoreMeta
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False, compare=False)
    """Activation arrays handed out by `array`, kept: their metadata is read once, and the chunk files a
    reader maps stay mapped for the next epoch (store.reader._KeptMaps) as long as the Store lives."""

    @property
    def layout(self) -> Layout:
        return self.meta.layout()

    @property
    def timesteps(self) -> np.ndarray:
        return read_array(self.root["timesteps"])

    def done(self) -> np.ndarray:
        """(N,) bool: samples completely written."""
        return read_array(self.root["done"])

    def read(self, name: str, selection: tuple[slice, ...] | None = None) -> np.ndarray:
        """`name[selection]` (a basic selection, default all) of any array of the store, every chunk it touches
        checked (`read_array`): a missing or damaged chunk is a ChunkError naming its file, never fill values."""
        return read_array(self.root[name], selection)

    def done_chunks(self) -> list[int]:
        """Sample chunks whose every sample is done."""
        done, lay = self.done(), self.layout
        return [c for c in range(lay.num_sample_chunks) if done[lay.sample_chunk(c)].all()]

    def array(self, name: str) -> zarr.Array:
        if name not in self.meta.act_names():
            raise StoreError(
                f"{self.path} has no activation array {name!r}; it has {', '.join(self.meta.act_names())}"
            )
        if name not in self._arrays:  # tide never resizes an array: its metadata stays true
            self._arrays[name] = self.root[name]
        return self._arrays[name]

    def identity(self) -> str:
        """A short hash of the metadata that defines the content (not the creation time, nor a codec that
        `tide store pack --codec` changed: the harvest's stands for it, so the hash is the one it always was)."""
        m = self.meta.model_dump(mode="json")
        m.pop("created", None)
        m["codec"] = m["harvest_config"].get("codec", m["codec"])
        return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]

    def stats(self, name: str, sample_chunks: list[int] | None = None) -> StepStats:
        """Per-step statistics from the writer's running sums, over done (or the given) sample chunks."""
        self.array(name)
        chunks = self.done_chunks() if sample_chunks is None else sample_chunks
        g = self.root["stats"][name]
        count, total, sumsq = (read_rows(g[stat], chunks).sum(0) for stat in ("count", "sum", "sumsq"))
        return moments(count, total, sumsq)


def moments(count: np.ndarray, total: np.ndarray, sumsq: np.ndarray) -> StepStats:
    n = np.maximum(count, 1)[:, None].astype(np.float64)
    mean = total / n
    var = np.maximum(sumsq / n - mean**2, 0.0)
    return StepStats(count=count, mean=mean, var=var, mean_sq_norm=sumsq.sum(1) / n[:, 0])


def open_store(path: str | Path) -> Store:
    """Open a store (a folder, a URL or a packed .zip; see store/open.py) for reading, with an error that says
    what is wrong when it is not a tide store."""
    try:
        loc = where(path)
        if loc.scheme == "local":
            path = loc.path
            if not path.exists():
                raise StoreError(f"store {path} does not exist; create one with `tide harvest --out {path}`")
            if not (path / "zarr.json").is_file():
                raise StoreError(
                    f"{path} is not a Zarr v3 store (no zarr.json); is it the folder `tide harvest --out` wrote?"
                )
        else:
            path = loc.path or loc.text
        zstore = zarr_store(loc)
        if loc.scheme != "local" and read_json(zstore, loc) is None:
            raise StoreError(_absent(zstore, loc))
    except LocationError as e:
        raise StoreError(str(e)) from e.__cause__
    try:
        root = zarr.open_group(zstore, mode="r", zarr_format=3)
    except Exception as e:
        raise StoreError(f"{path} could not be opened as a Zarr v3 group: {e}") from e
    attrs = dict(root.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(
            f"{path} is a Zarr group but not a tide store (format={attrs.get('format')!r}, expected {FORMAT!r})"
        )
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise StoreError(
            f"{path} has format_version {version!r}; this tide reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}" + ("; upgrade tide to read it" if newer else "")
        )
    try:
        meta = StoreMeta.model_validate(attrs)
    except ValidationError as e:
        raise StoreError(f"{path} has invalid tide metadata: {e}") from e
    return Store(path=path, root=root, meta=meta)


def _absent(zstore, loc: Where) -> str:
    """Why a remote or zip store has no zarr.json, as one line."""
    if not bucket_exists(zstore, loc):
        return f"{loc.text}: the bucket {bucket(loc)!r} does not exist; create it or fix the URL"
    if loc.scheme in ("http", "https"):
        return (
            f"{loc.text}/zarr.json was not found (HTTP 404): no store is served at {loc.text}; check the URL "
            "(it names the store folder, e.g. https://host/data/h.zarr)"
        )
    if loc.scheme == "zip":
        return (
            f"{loc.text} holds no zarr.json at its top; make the zip with `tide store pack STORE {loc.text}`"
        )
    return f"store {loc.text} does not exist; create one with `tide harvest --out {loc.text}`"


# --- reading whole chunks (the training loader's path) ---------------------------------------------


class ChunkError(StoreError):
    """A chunk (that must exist) that is missing, fails its checksum, or does not decode.

    `where` names the array, the chunk file and the samples, steps and tokens it holds; `problem` says what is
    wrong with it; the message adds how that array's chunks are mended. `samples`: the samples whose harvest
    writes the chunk again (None for timesteps and step_index, written once); `file`: the file or store key.
    """

    def __init__(
        self,
        message: str,
        *,
        where: str = "",
        problem: str = "",
        samples: slice | None = None,
        file: str = "",
    ):
        super().__init__(message)
        self.where, self.problem, self.samples, self.file = where, problem, samples, file


def chunk_error(arr: zarr.Array, coords: tuple[int, ...], problem: str) -> ChunkError:
    """A ChunkError for chunk `coords` of `arr`, saying how that array's chunks are mended."""
    region = chunk_region(coords, arr.shape, arr.metadata.chunk_grid.chunk_shape)
    dims = arr.metadata.dimension_names or ACT_DIMS[: len(region)]
    span = ", ".join(
        f"{dim}s {s.start}..{s.stop - 1}" for dim, s in zip(dims, region, strict=True) if dim != "d"
    )
    name = arr.path or arr.basename
    where = f"{name}: chunk file {chunk_file(arr, coords)} ({span})"
    store = _store_root(arr) or "PATH"
    restore = (
        f"{where} {problem}. The store is damaged: `tide store verify {store}` lists every damaged chunk; "
    )
    if dims[0] == "sample_chunk":  # stats/<array>/*: sums of what the activations hold
        batch = _batch_size(arr)
        samples = slice(region[0].start * batch, region[0].stop * batch) if batch else None
        fix = (
            f"`tide store stats {store} --write` rewrites the sums from the activations (or restore the file "
            "from a copy of the store)"
        )
    elif dims[0] == "sample":  # harvested with its samples: a harvest writes it again
        samples = region[0]
        fix = (
            f"restore the file from a copy of the store, or run `tide store verify {store} --reset-damaged` and "
            f"then the store's `tide harvest --out {store}` command again to write those samples anew"
        )
    else:  # timesteps, step_index: written once, when the store was created
        samples = None
        fix = "restore the file from a copy of the store"
    return ChunkError(
        restore + fix, where=where, problem=problem, samples=samples, file=chunk_file(arr, coords)
    )


def _batch_size(arr: zarr.Array) -> int | None:
    """Samples per sample chunk of the store holding `arr` (the chunk length of its `done` array), if known."""
    try:
        root = zarr.open_group(arr.store, mode="r", zarr_format=3)
        return root["done"].metadata.chunk_grid.chunk_shape[0]
    except Exception:  # an array opened on its own: its store is not the store's root
        return None


class MissingChunkWarning(UserWarning):
    """A version-1 store lacks a chunk file: it reads as zeros, which is right only if the chunk was all zero."""


def chunk_file(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """Where chunk `coords` of `arr` lives: a file path for a local store, else the store key."""
    key = arr.metadata.encode_chunk_key(coords)
    key = f"{arr.path}/{key}" if arr.path else key
    root = _store_root(arr)
    return str(Path(root) / key) if root is not None else key


def _store_root(arr: zarr.Array) -> Path | None:
    from zarr.storage import LocalStore

    return Path(arr.store.root) if isinstance(arr.store, LocalStore) else None


def checksummed(arr: zarr.Array) -> bool:
    """Whether the array's chunks end with a crc32c (format version 3: every array; version 2: activations and
    token_index): then every chunk is written, and a missing one is lost, not the fill value."""
    from zarr.codecs import Crc32cCodec

    return any(isinstance(c, Crc32cCodec) for c in arr.metadata.codecs)


def missing_problem(arr: zarr.Array) -> str:
    """What a missing chunk file of `arr` means, as the end of a sentence naming it."""
    if checksummed(arr):
        return "is missing"
    if tuple(arr.metadata.dimension_names or ()) == ACT_DIMS:
        return (
            "is missing (a version-1 store leaves out chunks that are all zero, so it reads as zeros: "
            "lost unless these activations really are all zero)"
        )
    fill = arr.metadata.fill_value
    return (
        f"is missing (stores before format version 3 leave out chunks of {arr.basename} that hold only its fill "
        f"value {fill}, so it reads as {fill}: lost unless those values really are all {fill})"
    )


def _missing(arr: zarr.Array, coords: tuple[int, ...]) -> None:
    """Refuse a missing chunk of a checksummed array (format version 3: every array; version 2: the data
    arrays), which is always a lost one; warn about a missing activation chunk of a version-1 store (it reads
    as zeros, which it may be). A small array of a store before version 3 reads as its fill value without a
    word: those left out every chunk equal to it, and a missing `done` chunk means samples not done yet."""
    if checksummed(arr):
        raise chunk_error(arr, coords, "is missing")
    if tuple(arr.metadata.dimension_names or ()) != ACT_DIMS:
        return
    warnings.warn(
        MissingChunkWarning(
            f"{arr.basename}: chunk file {chunk_file(arr, coords)} is missing and reads as zeros; a version-1 "
            "store leaves out all-zero chunks, so it may be one, or it may be lost; "
            f"`tide store verify {_store_root(arr) or 'PATH'}` lists every missing chunk"
        ),
        stacklevel=3,
    )


def read_into(
    arr: zarr.Array,
    selection: tuple[slice, ...],
    out: np.ndarray,
    direct: bool = True,
    fetched: Future | None = None,
) -> None:
    """Decode `arr[selection]` into `out` (an array shaped like the selection); see `chunk_values`."""
    with chunk_values(arr, selection, out, direct, fetched) as values:
        if values is not out:
            np.copyto(out, values)


def read_array(arr: zarr.Array, selection: tuple[slice, ...] | None = None) -> np.ndarray:
    """`arr[selection]` (unit-step slices of the first axes, default everything), read chunk by chunk
    through `read_into`: each chunk's checksum is verified, and a chunk that is missing (format version 3
    writes every chunk of every array, so a missing one is lost) or does not decode is a ChunkError naming
    its file, never the fill value zarr would return."""
    given = tuple(selection or ())
    given += (slice(None),) * (arr.ndim - len(given))  # the axes not named: all of them
    selection = tuple(slice(*s.indices(n)) for s, n in zip(given, arr.shape, strict=True))
    out = np.empty(tuple(s.stop - s.start for s in selection), dtype=arr.dtype)
    touched = chunks_touched(selection, arr.shape, arr.metadata.chunk_grid.chunk_shape)
    for region, block in _read_chunks(arr, touched):
        both = [(max(r.start, s.start), min(r.stop, s.stop)) for r, s in zip(region, selection, strict=True)]
        into = tuple(slice(a - s.start, b - s.start) for (a, b), s in zip(both, selection, strict=True))
        out[into] = block[
            tuple(slice(a - r.start, b - r.start) for (a, b), r in zip(both, region, strict=True))
        ]
    return out


def read_rows(arr: zarr.Array, rows: list[int] | np.ndarray) -> np.ndarray:
    """`arr[rows]` (whole rows along the first axis, in the order given), every chunk checked as by read_array."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    grid = arr.metadata.chunk_grid.chunk_shape
    rest = tuple(slice(None) for _ in arr.shape[1:])
    touched = [
        coords
        for a in sorted({int(r) // grid[0] for r in rows})
        for coords in chunks_touched((slice(a * grid[0], a * grid[0] + 1), *rest), arr.shape, grid)
    ]
    for region, block in _read_chunks(arr, touched):
        at = np.flatnonzero((rows >= region[0].start) & (rows < region[0].stop))
        out[(at, *region[1:])] = block[rows[at] - region[0].start]
    return out


def read_points(arr: zarr.Array, points: tuple[np.ndarray, ...]) -> np.ndarray:
    """`arr[points]` for integer coordinate arrays (one per axis, of equal length: zarr's coordinate
    selection), every chunk they touch checked as by read_array."""
    points = tuple(np.asarray(p, dtype=np.int64).reshape(-1) for p in points)
    grid = arr.metadata.chunk_grid.chunk_shape
    chunk_of = np.stack([p // c for p, c in zip(points, grid, strict=True)], axis=1)  # (P, ndim)
    unique, which = np.unique(chunk_of, axis=0, return_inverse=True)
    out = np.empty(len(points[0]), dtype=arr.dtype)
    touched = [tuple(int(x) for x in u) for u in unique]
    for i, (region, block) in enumerate(_read_chunks(arr, touched)):
        at = np.flatnonzero(which.reshape(-1) == i)
        out[at] = block[tuple(p[at] - r.start for p, r in zip(points, region, strict=True))]
    return out


def _read_chunks(
    arr: zarr.Array, touched: list[tuple[int, ...]]
) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """(region, values) of each chunk in `touched`, read and checked by read_into; a remote store's are
    requested all at once (store.remote.fetch_ahead)."""
    from tide.store.remote import fetch_ahead

    grid = arr.metadata.chunk_grid.chunk_shape
    regions = [chunk_region(c, arr.shape, grid) for c in touched]
    fetches = fetch_ahead(arr, regions)
    try:
        for i, region in enumerate(regions):
            block = np.empty(tuple(r.stop - r.start for r in region), dtype=arr.dtype)
            read_into(arr, region, block, fetched=fetches[i])
            yield region, block
    finally:
        fetches.cancel()


@contextmanager
def chunk_values(
    arr: zarr.Array,
    selection: tuple[slice, ...],
    scratch: np.ndarray,
    direct: bool = True,
    fetched: Future | None = None,
) -> Iterator[np.ndarray]:
    """The values of `arr[selection]`, each chunk's checksum verified (where it has one): where they need no decoding
    (an uncompressed chunk) a read-only view of the chunk's own bytes, mapped from its file or as fetched, so
    that the caller copies them once, to where they go; else `scratch` (shaped like the selection) decoded.
    A view is valid inside the `with` only.

    `fetched`: the chunk's bytes already requested by `store.remote.fetch_ahead` (a remote store), waited on
    here.

    A selection inside one chunk is read by tide itself, without zarr's async pipeline, which on a 2-core
    machine costs as much again as the decompression; anything else (and direct=False, the reference the
    fast path is tested against) goes through zarr. Either way a chunk that is missing, fails its checksum
    or does not decode raises ChunkError naming its file.
    """
    how = _direct_codec(arr) if direct else False
    found = _one_chunk(arr, selection, arr.metadata.chunk_grid.chunk_shape) if how is not False else None
    if found is None:
        _read_with_zarr(arr, selection, scratch)
        yield scratch
        return
    selection, coords, whole = found
    with _chunk_bytes(arr, coords, fetched) as data:
        if data is None:
            _missing(arr, coords)
            scratch[...] = arr.metadata.fill_value
            yield scratch
        else:
            yield _decoded(arr, data, coords, selection, how, whole, scratch)


@contextmanager
def _chunk_bytes(
    arr: zarr.Array, coords: tuple[int, ...], fetched: Future | None
) -> Iterator[np.ndarray | None]:
    """A chunk's stored bytes as uint8, None when the chunk is missing: a local file mapped into memory (the
    page cache's own pages: no copy, and no GIL held while they are read), a remote one fetched."""
    if fetched is not None:
        data = fetched.result()  # requested by store.remote.fetch_ahead, with many others
        yield None if data is None else np.frombuffer(data, np.uint8)
        return
    folder, kept = _local_chunks(arr)
    key = arr.metadata.encode_chunk_key(coords)
    if folder is None:
        data = _fetch(arr, f"{arr.path}/{key}" if arr.path else key)  # a remote or zip store: one request
        yield None if data is None else np.frombuffer(data, np.uint8)
    else:
        with _mapped(folder + key, kept) as data:
            yield data


def _local_chunks(arr: zarr.Array) -> tuple[str | None, _KeptMaps | None]:
    """(the folder of a local array's chunk keys, ending in a separator, and its kept mappings), or (None,
    None) for a remote or zip store; made once per array object (a read thread looks them up per chunk)."""
    cached = getattr(arr, "_tide_local_chunks", None)
    if cached is None:
        root = _store_root(arr)
        folder = None if root is None else os.path.join(root, arr.path, "")
        cached = (folder, None if folder is None else _kept_maps(arr))
        object.__setattr__(arr, "_tide_local_chunks", cached)  # zarr.Array is a frozen dataclass
    return cached


@contextmanager
def _mapped(path: str | Path, kept: _KeptMaps | None = None) -> Iterator[np.ndarray | None]:
    """A file's bytes mapped read-only (read into memory where it cannot be mapped); None when it is absent.

    `kept`: the mapping is kept for the next read of the same file (the page faults of mapping a chunk anew
    cost a fifth of reading it), as long as the path names the same file (device, inode and size checked on
    every read: a file renamed over it, or cut short, is mapped anew) and `kept` has room.

    zarr replaces a chunk file by renaming a new one over it, so a mapped file is never cut short under the
    reader by tide's own writers."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        yield None
        return
    if kept is not None and (data := kept.get(path, now)) is not None:
        yield data
        return
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        yield None
        return
    mapping = None
    with f:
        try:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            data = np.frombuffer(mapping, np.uint8)
        except (OSError, ValueError):  # an empty file, or a file system without mmap
            data = np.frombuffer(f.read(), np.uint8)
        if mapping is not None and kept is not None and kept.keep(path, os.fstat(f.fileno()), mapping, data):
            mapping = None  # kept: not unmapped here
    try:
        yield data
    finally:
        del data
        if mapping is not None:
            with suppress(BufferError):  # a view the caller still holds keeps the mapping until it goes
                mapping.close()


class _KeptMaps:
    """One array's chunk files kept mapped between reads (a training run reads each once per epoch), up to
    `limit` of them; each is unmapped when it is replaced or when the array object goes.

    A mapping holds no memory of its own (the pages are the page cache's, which the kernel may still drop)
    but counts against the process's limit of mappings (vm.max_map_count), hence the limit; the files beyond
    it are mapped for each read. A file deleted while kept keeps its disk space until the array goes."""

    def __init__(self, limit: int):
        self.limit = limit
        self.maps: dict[str, tuple[tuple[int, int, int], mmap.mmap, np.ndarray]] = {}
        self.lock = threading.Lock()

    def get(self, path: Path, now: os.stat_result) -> np.ndarray | None:
        """The kept bytes of `path` if they are still the file's (same device, inode and size), else None."""
        with self.lock:
            entry = self.maps.get(str(path))
            if entry is None:
                return None
            if entry[0] == (now.st_dev, now.st_ino, now.st_size):
                return entry[2]
            del self.maps[str(path)]
        with suppress(BufferError):  # a reader still using the old file's bytes keeps them until it is done
            entry[1].close()
        return None

    def keep(self, path: Path, st: os.stat_result, mapping: mmap.mmap, data: np.ndarray) -> bool:
        """Keep a new mapping of `path` (st: the mapped file's own stat) if there is room."""
        with self.lock:
            if str(path) in self.maps or len(self.maps) >= self.limit:
                return False
            self.maps[str(path)] = ((st.st_dev, st.st_ino, st.st_size), mapping, data)
            return True


_KEPT_LOCK = threading.Lock()


def _kept_maps(arr: zarr.Array) -> _KeptMaps:
    """The array's kept chunk mappings, made on first use and stored on the array object (so they go with it)."""
    kept = getattr(arr, "_tide_kept_maps", None)
    if kept is None:
        with _KEPT_LOCK:  # read threads start together: one set per array
            kept = getattr(arr, "_tide_kept_maps", None)
            if kept is None:
                kept = _KeptMaps(_map_limit())
                object.__setattr__(arr, "_tide_kept_maps", kept)  # zarr.Array is a frozen dataclass
    return kept


def _map_limit() -> int:
    """Mappings one array may keep: an eighth of the process's limit (vm.max_map_count, 65530 by default),
    so that several arrays read together, and everything else the process maps, stay under it."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text()) // 8
    except (OSError, ValueError):  # not Linux
        return 1024


def _one_chunk(
    arr: zarr.Array, selection: tuple[slice, ...], shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], tuple[int, ...], bool] | None:
    """(normalised selection, chunk coordinates, whether it is the whole chunk), or None when the selection
    is strided, empty or spans more than one chunk."""
    selection = tuple(slice(*s.indices(n)) for s, n in zip(selection, arr.shape, strict=True))
    if any(s.step != 1 or s.stop <= s.start for s in selection):
        return None
    coords = tuple(s.start // c for s, c in zip(selection, shape, strict=True))
    if any((s.stop - 1) // c != i for s, c, i in zip(selection, shape, coords, strict=True)):
        return None
    whole = all(s.stop - s.start == c for s, c in zip(selection, shape, strict=True))
    return selection, coords, whole


def _decoded(
    arr: zarr.Array, data: np.ndarray, coords: tuple[int, ...], selection: tuple[slice, ...], direct,
    whole: bool, scratch: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """A chunk's stored bytes checked, and the part `selection` covers: a view of them when they are the raw
    values, else decoded into `scratch`."""
    codec, checksum = direct
    shape = arr.metadata.chunk_grid.chunk_shape
    trailer = CHECKSUM_BYTES if checksum else 0
    if len(data) < trailer:
        raise chunk_error(arr, coords, f"has {len(data)} bytes, fewer than its {trailer}-byte checksum")
    payload = data[: len(data) - trailer]
    if checksum:
        _check(arr, coords, payload, data[len(payload) :].tobytes())
    inner = tuple(
        slice(s.start - i * c, s.stop - i * c) for s, c, i in zip(selection, shape, coords, strict=True)
    )
    raw_bytes = math.prod(shape) * np.dtype(arr.dtype).itemsize
    if codec is None and payload.nbytes != raw_bytes:
        raise chunk_error(arr, coords, f"has {len(data)} bytes, expected {raw_bytes + trailer}")
    try:
        if codec is None:
            return payload.view(arr.dtype).reshape(shape)[inner]
        if whole and scratch.flags.c_contiguous:
            codec.decode(payload, out=scratch)  # straight into the caller's buffer
        else:
            scratch[...] = np.frombuffer(codec.decode(payload), dtype=arr.dtype).reshape(shape)[inner]
        return scratch
    except Exception as e:
        raise chunk_error(arr, coords, f"could not be decoded ({type(e).__name__}: {e})") from e


def _read_with_zarr(arr: zarr.Array, selection: tuple[slice, ...], out: np.ndarray) -> None:
    from zarr.core.buffer import cpu
    from zarr.core.sync import sync

    grid = arr.metadata.chunk_grid.chunk_shape
    touched = chunks_touched(selection, arr.shape, grid)
    # zarr reads a missing chunk as the fill value, without a word.
    prefix = f"{arr.path}/" if arr.path else ""
    for coords in touched:
        if not sync(arr.store.exists(prefix + arr.metadata.encode_chunk_key(coords))):
            _missing(arr, coords)
    try:
        arr.get_basic_selection(selection, out=cpu.NDBuffer.from_numpy_array(out))
    except Exception as e:
        # zarr's error names no chunk: find the one that fails on its own.
        for coords in touched:
            try:
                arr.get_basic_selection(chunk_region(coords, arr.shape, grid))
            except Exception as bad:
                raise chunk_error(arr, coords, f"could not be read ({_describe(bad)})") from bad
        raise StoreError(f"reading {arr.basename}[{selection}] failed: {e}") from e


def _describe(e: Exception) -> str:
    if "checksum" in str(e).lower():
        return "its crc32c checksum does not match its bytes"
    return f"{type(e).__name__}: {e}"


class _Direct(NamedTuple):
    codec: Any
    """numcodecs codec of the payload, or None when it is the raw bytes."""
    checksum: bool
    """The file ends with a crc32c of the bytes before it."""


def _direct_codec(arr: zarr.Array) -> _Direct | bool:
    """How to decode `arr`'s chunk files directly, or False when they cannot be; cached per array."""
    cached = getattr(arr, "_tide_direct_codec", None)
    if cached is not None:
        return cached[0]
    from numcodecs import Blosc, Zstd
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

    codecs, direct = list(arr.metadata.codecs), False
    checksum = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    if checksum:
        codecs = codecs[:-1]
    little = np.dtype(arr.dtype).byteorder in "<|=" and np.little_endian
    if codecs and isinstance(codecs[0], BytesCodec) and little:
        if len(codecs) == 1:
            direct = _Direct(None, checksum)
        elif len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
            direct = _Direct(Blosc(), checksum)  # a blosc frame carries its own parameters
        elif len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
            direct = _Direct(Zstd(), checksum)
    object.__setattr__(arr, "_tide_direct_codec", (direct,))  # zarr.Array is a frozen dataclass
    return direct


def _fetch(arr: zarr.Array, key: str) -> bytes | None:
    """A chunk's bytes from any zarr store (None when it is not there), one request at a time;
    the loader asks for a window's chunks all at once through `store.remote.fetch_ahead` instead."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(arr.store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _check(arr: zarr.Array, coords: tuple[int, ...], payload: np.ndarray, stored: bytes) -> None:
    """Compare a chunk's crc32c trailer with its payload."""
    computed = crc32c.crc32c(payload)  # the GIL is released (from 32 KiB): read threads check in parallel
    if computed != int.from_bytes(stored, "little"):
        raise chunk_error(
            arr,
            coords,
            f"fails its checksum (crc32c {computed:#010x} of its bytes, "
            f"{int.from_bytes(stored, 'little'):#010x} stored): its bytes changed (or were cut short) after it was written",
        )


def default_read_threads() -> int:
    """One read thread per core this process may run on: its CPU affinity, which taskset, a container or a job
    scheduler narrows (all cores where the OS has no affinity call), shared among the ranks torchrun starts on
    this machine (LOCAL_WORLD_SIZE). A read thread spends its time in code that releases the GIL (mapping,
    crc32c, decompression, numpy's scatter), so they scale with cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def configure_read_threads(max_workers: int) -> bool:
    """Size zarr's decoding thread pool; returns False when zarr already made its pool (the size is then fixed).

    zarr creates the pool on the first read, so call this once at start-up, before opening arrays.
    """
    from zarr.core import sync

    if sync._executor is not None:
        return False
    zarr.config.set({"threading.max_workers": max_workers})
    return True
