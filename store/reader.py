"""Open a tide store and read its metadata, completion state and statistics."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr
from pydantic import ValidationError

from store.schema import FORMAT, FORMAT_VERSION, Layout, StoreMeta


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

    path: Path
    root: zarr.Group
    meta: StoreMeta

    @property
    def layout(self) -> Layout:
        return self.meta.layout()

    @property
    def timesteps(self) -> np.ndarray:
        return self.root["timesteps"][:]

    def done(self) -> np.ndarray:
        """(N,) bool: samples completely written."""
        return self.root["done"][:]

    def done_chunks(self) -> list[int]:
        """Sample chunks whose every sample is done."""
        done, lay = self.done(), self.layout
        return [c for c in range(lay.num_sample_chunks) if done[lay.sample_chunk(c)].all()]

    def array(self, name: str) -> zarr.Array:
        if name not in self.meta.act_names():
            raise StoreError(
                f"{self.path} has no activation array {name!r}; it has {', '.join(self.meta.act_names())}"
            )
        return self.root[name]

    def identity(self) -> str:
        """A short hash of the metadata that defines the content (not the creation time)."""
        m = self.meta.model_dump(mode="json")
        m.pop("created", None)
        return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]

    def stats(self, name: str, sample_chunks: list[int] | None = None) -> StepStats:
        """Per-step statistics from the writer's running sums, over done (or the given) sample chunks."""
        self.array(name)
        chunks = self.done_chunks() if sample_chunks is None else sample_chunks
        g = self.root["stats"][name]
        idx = np.asarray(chunks, dtype=np.int64)
        count = g["count"].get_orthogonal_selection((idx, slice(None))).sum(0)
        total = g["sum"].get_orthogonal_selection((idx, slice(None), slice(None))).sum(0)
        sumsq = g["sumsq"].get_orthogonal_selection((idx, slice(None), slice(None))).sum(0)
        return moments(count, total, sumsq)


def moments(count: np.ndarray, total: np.ndarray, sumsq: np.ndarray) -> StepStats:
    n = np.maximum(count, 1)[:, None].astype(np.float64)
    mean = total / n
    var = np.maximum(sumsq / n - mean**2, 0.0)
    return StepStats(count=count, mean=mean, var=var, mean_sq_norm=sumsq.sum(1) / n[:, 0])


def open_store(path: str | Path) -> Store:
    """Open a store for reading, with an error that says what is wrong when it is not a tide store."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"store {path} does not exist; create one with `tide harvest --out {path}`")
    if not (path / "zarr.json").is_file():
        raise StoreError(
            f"{path} is not a Zarr v3 store (no zarr.json); is it the folder `tide harvest --out` wrote?"
        )
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception as e:
        raise StoreError(f"{path} could not be opened as a Zarr v3 group: {e}") from e
    attrs = dict(root.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(
            f"{path} is a Zarr group but not a tide store (format={attrs.get('format')!r}, expected {FORMAT!r})"
        )
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path} has format_version {attrs.get('format_version')}; this tide reads version {FORMAT_VERSION}"
        )
    try:
        meta = StoreMeta.model_validate(attrs)
    except ValidationError as e:
        raise StoreError(f"{path} has invalid tide metadata: {e}") from e
    return Store(path=path, root=root, meta=meta)


# --- reading whole chunks (the training loader's path) ---------------------------------------------


def read_into(arr: zarr.Array, selection: tuple[slice, ...], out: np.ndarray, direct: bool = True) -> None:
    """Decode `arr[selection]` straight into `out` (a C-contiguous array shaped like the selection).

    A selection inside one chunk of a local store is decoded by `_decode_chunk` without zarr's async
    pipeline, which on a 2-core machine costs as much again as the decompression itself; anything else
    (and direct=False, the reference the fast path is tested against) goes through zarr.
    """
    if not (direct and _decode_chunk(arr, selection, out)):
        from zarr.core.buffer import cpu

        arr.get_basic_selection(selection, out=cpu.NDBuffer.from_numpy_array(out))


def _direct_codec(arr: zarr.Array):
    """The numcodecs codec that undoes `arr`'s chunk encoding, False if there is none; cached per array."""
    cached = getattr(arr, "_tide_direct_codec", None)
    if cached is not None:
        return cached[0]
    from numcodecs import Blosc, Zstd
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
    from zarr.storage import LocalStore

    codecs, codec = list(arr.metadata.codecs), False
    little = np.dtype(arr.dtype).byteorder in "<|=" and np.little_endian
    if isinstance(arr.store, LocalStore) and codecs and isinstance(codecs[0], BytesCodec) and little:
        if len(codecs) == 1:
            codec = None
        elif len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
            codec = Blosc()  # a blosc frame carries its own parameters
        elif len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
            codec = Zstd()
    object.__setattr__(arr, "_tide_direct_codec", (codec,))  # zarr.Array is a frozen dataclass
    return codec


def _decode_chunk(arr: zarr.Array, selection: tuple[slice, ...], out: np.ndarray) -> bool:
    """Read a selection that lies inside one chunk by decoding the chunk's file; False if not applicable."""
    codec = _direct_codec(arr)
    if codec is False:
        return False
    shape = arr.metadata.chunk_grid.chunk_shape
    selection = tuple(slice(*s.indices(n)) for s, n in zip(selection, arr.shape, strict=True))
    if any(s.step != 1 or s.stop <= s.start for s in selection):
        return False
    coords = tuple(s.start // c for s, c in zip(selection, shape, strict=True))
    if any((s.stop - 1) // c != i for s, c, i in zip(selection, shape, coords, strict=True)):
        return False
    path = Path(arr.store.root) / arr.path / arr.metadata.encode_chunk_key(coords)
    whole = all(s.stop - s.start == c for s, c in zip(selection, shape, strict=True))
    try:
        if whole and codec is None and out.flags.c_contiguous:
            with open(path, "rb", buffering=0) as f:  # an uncompressed chunk is its bytes: one copy
                if f.readinto(memoryview(out).cast("B")) == out.nbytes:
                    return True
            raise ValueError(f"chunk file {path} is shorter than the {out.nbytes} bytes of a chunk")
        data = path.read_bytes()
    except FileNotFoundError:  # zarr does not write chunks that are all fill value
        out[...] = arr.metadata.fill_value
        return True
    inner = tuple(
        slice(s.start - i * c, s.stop - i * c) for s, c, i in zip(selection, shape, coords, strict=True)
    )
    if whole and codec is not None:
        codec.decode(data, out=out)  # straight into the caller's buffer
        return True
    raw = np.frombuffer(data if codec is None else codec.decode(data), dtype=arr.dtype).reshape(shape)
    out[...] = raw[inner]
    return True


def configure_read_threads(max_workers: int) -> bool:
    """Size zarr's decoding thread pool; returns False when zarr already made its pool (the size is then fixed).

    zarr creates the pool on the first read, so call this once at start-up, before opening arrays.
    """
    from zarr.core import sync

    if sync._executor is not None:
        return False
    zarr.config.set({"threading.max_workers": max_workers})
    return True
