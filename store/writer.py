"""Create a tide store, write activation blocks and their statistics, and do it off the model's thread.

Writes are whole chunks (see store.schema), issued by one background thread, in submission order. A
sample's `done` flag is written after every one of its blocks, so a store killed at any instant holds
only complete samples where `done` says so.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tide.store.open import where, zarr_store
from tide.store.schema import ACT_DIMS, CODECS, StoreMeta, as_float, numpy_storage_dtype
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

# Measured on real activations (FORMAT.md, "Codecs"): level 1 with byte shuffle gains what higher levels and
# zstd alone do, and a 256 KB block keeps decompression parallel within a chunk.
BLOSC_BLOCKSIZE = 256 * 1024


# Every chunk of every array is written, even one that holds only the fill value (zarr leaves those out, and
# deletes one that a write fills with it, by default), so that a missing chunk file always means a lost one.
# Not stored in the metadata: every write of a store sets it (`everything(array)`).
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def everything(arr: zarr.Array) -> zarr.Array:
    """`arr` configured to write every chunk, also one that holds only the fill value."""
    return arr.with_config(WRITE_EVERY_CHUNK)


def compressors(codec: str, itemsize: int) -> list[Any]:
    """The bytes-to-bytes codecs of every array: the compressor named on the command line, then a crc32c
    checksum of the compressed bytes, which readers verify on every read (format version 3; version 2 had it
    on the activations and token_index only)."""
    return [*_compressor(codec, itemsize), Crc32cCodec()]


def _compressor(codec: str, itemsize: int) -> list[Any]:
    if codec == "blosc-zstd":
        return [
            BloscCodec(
                cname="zstd",
                clevel=1,
                shuffle=BloscShuffle.shuffle,
                typesize=itemsize,
                blocksize=BLOSC_BLOCKSIZE,
            )
        ]
    if codec == "zstd":
        return [ZstdCodec(level=3)]
    if codec == "none":
        return []
    raise ValueError(f"codec={codec!r} is unknown; choose one of {', '.join(CODECS)}")


def create_store(
    path: Path | str,
    meta: StoreMeta,
    timesteps: np.ndarray,
    seeds: np.ndarray,
    labels: np.ndarray | None,
    prompt_index: np.ndarray | None,
    save_images_shape: tuple[int, int, int] | None = None,
) -> zarr.Group:
    """Create every array of a new store (empty where data comes later) at a folder or s3/gs URL, and write
    the metadata."""
    # mode "w-": create, never clear. zarr's "w" first deletes everything under the path, the files of
    # someone's that tide must never touch included (--overwrite deletes tide's own first: store/outputs.py).
    root = zarr.open_group(
        zarr_store(where(path), "w"), mode="w-", zarr_format=3, attributes=meta.model_dump(mode="json")
    )
    _per_step_and_sample(root, meta, timesteps, seeds, labels, prompt_index)
    if save_images_shape is not None:
        root.create_array(
            "images",
            shape=(meta.layout().num_samples, *save_images_shape),
            dtype="uint8",
            chunks=(meta.layout().batch_size, *save_images_shape),
            fill_value=0,
            compressors=compressors(meta.codec, 1),
            dimension_names=["sample", "height", "width", "channel"],
        )
    # The CF `coordinates` attribute: xarray makes these coordinates of every activation array (not data
    # variables), so `ds.set_xindex("timesteps").sel(timesteps=...)` and `ds.where(ds.label == 3)` work.
    per_sample = ["seed", "label" if labels is not None else "prompt_index", "done"]
    coordinates = " ".join(
        ["timesteps", "step_index", *per_sample, *(["token_index"] if meta.tokens.subsampled else [])]
    )
    _activations_and_stats(root, meta, coordinates)
    return root


def _per_step_and_sample(
    root: zarr.Group,
    meta: StoreMeta,
    timesteps: np.ndarray,
    seeds: np.ndarray,
    labels: np.ndarray | None,
    prompt_index: np.ndarray | None,
) -> None:
    """The coordinate arrays: timesteps and step_index per step; seed, label or prompt_index, done per
    sample; token_index per (sample, step, token) when tokens are subsampled."""
    lay = meta.layout()
    n, s = lay.num_samples, lay.num_steps
    # Written whole now, every chunk (`done` as all false): a chunk missing later is a lost one.
    per_step = {
        "timesteps": timesteps.astype(np.float64),
        "step_index": np.asarray(meta.step_indices, np.int32),
    }
    for name, values in per_step.items():
        root.create_array(
            name, data=values, compressors=compressors(meta.codec, values.itemsize), config=WRITE_EVERY_CHUNK,
            dimension_names=["step"],
        )  # fmt: skip
    per_sample = {"seed": seeds, "label": labels, "prompt_index": prompt_index, "done": np.zeros(n, bool)}
    for name, values in per_sample.items():
        if values is not None:
            values = values if name == "done" else values.astype(np.int64)
            root.create_array(
                name, data=values, chunks=(lay.batch_size,), compressors=compressors(meta.codec, values.itemsize),
                config=WRITE_EVERY_CHUNK, dimension_names=["sample"],
            )  # fmt: skip
    if meta.tokens.subsampled:
        root.create_array(
            "token_index",
            shape=(n, s, lay.tokens),
            dtype="int32",
            chunks=(lay.batch_size, lay.steps_per_chunk, lay.tokens),
            fill_value=-1,
            compressors=compressors(meta.codec, 4),
            config=WRITE_EVERY_CHUNK,
            dimension_names=["sample", "step", "token"],
        )


def _activations_and_stats(root: zarr.Group, meta: StoreMeta, coordinates: str) -> None:
    """One empty array per (site, layer, branch) and its running-sum group under stats/."""
    lay = meta.layout()
    c, s = lay.num_sample_chunks, lay.num_steps
    dtype = numpy_storage_dtype(meta.dtype)
    stats = root.create_group("stats")
    for name in meta.act_names():
        root.create_array(
            name,
            shape=lay.act_shape,
            dtype=dtype,
            chunks=lay.act_chunks,
            fill_value=0,
            compressors=compressors(meta.codec, dtype.itemsize),
            config=WRITE_EVERY_CHUNK,
            dimension_names=list(ACT_DIMS),
            attributes={"logical_dtype": meta.dtype, "coordinates": coordinates},
        )
        g = stats.create_group(name)
        g.create_array(
            "count",
            shape=(c, s),
            dtype="int64",
            chunks=(1, s),
            fill_value=0,
            compressors=compressors(meta.codec, 8),
            dimension_names=["sample_chunk", "step"],
        )
        for stat in ("sum", "sumsq"):
            g.create_array(
                stat,
                shape=(c, s, lay.d_model),
                dtype="float64",
                chunks=(1, s, lay.d_model),
                fill_value=0.0,
                compressors=compressors(meta.codec, 8),
                dimension_names=["sample_chunk", "step", "d"],
            )


def block_stats(block: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count (s,), sum (s, D), sumsq (s, D)) of a (b, s, T, D) block of stored values, in float64."""
    x = as_float(block, dtype).astype(np.float64)
    b, s, t, _ = x.shape
    return np.full(s, b * t, dtype=np.int64), x.sum(axis=(0, 2)), np.square(x).sum(axis=(0, 2))


class StoreWriter:
    """Writes blocks into an open store; `submit` hands work to one background thread.

    The queue is bounded so that a slow disk pauses the model instead of filling memory. An exception
    in the writer thread is raised again in the caller's thread at the next submit or at close.
    """

    def __init__(self, root: zarr.Group, meta: StoreMeta, max_pending: int = 4):
        self.root, self.meta, self.layout = root, meta, meta.layout()
        self._queue: queue.Queue[tuple[Callable[..., None], tuple] | None] = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self.samples_done = 0
        """Samples this writer has marked done: what a failed run kept, counted without asking the store."""
        self._thread = threading.Thread(target=self._run, name="tide-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            fn, args = job
            if self._error is None:
                try:
                    fn(*args)
                except BaseException as e:  # re-raised in the submitting thread
                    self._error = e
            self._queue.task_done()
        self._queue.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing to {self.root.store} failed: {self._error}") from self._error

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._check()
        self._queue.put((fn, args))

    def close(self) -> None:
        """Wait for every pending write, stop the thread, and raise any write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._check()

    # The jobs: each runs in the writer thread.

    def write_block(self, name: str, sample_chunk: int, steps: slice, block: np.ndarray) -> None:
        """Write a (b, s, T, D) block of stored values and its statistics."""
        samples = self.layout.sample_chunk(sample_chunk)
        everything(self.root[name])[samples, steps] = block
        count, total, sumsq = block_stats(block, self.meta.dtype)
        g = self.root["stats"][name]
        everything(g["count"])[sample_chunk, steps] = count
        everything(g["sum"])[sample_chunk, steps] = total
        everything(g["sumsq"])[sample_chunk, steps] = sumsq

    def write_token_index(self, sample_chunk: int, steps: slice, index: np.ndarray) -> None:
        everything(self.root["token_index"])[self.layout.sample_chunk(sample_chunk), steps] = index

    def write_images(self, sample_chunk: int, images: np.ndarray) -> None:
        everything(self.root["images"])[self.layout.sample_chunk(sample_chunk)] = images

    def mark_done(self, sample_chunk: int) -> None:
        samples = self.layout.sample_chunk(sample_chunk)
        everything(self.root["done"])[samples] = np.ones(samples.stop - samples.start, dtype=bool)
        self.samples_done += samples.stop - samples.start


def _existing(path: Path) -> Path:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that will hold `path` (its nearest existing ancestor)."""
    return shutil.disk_usage(_existing(path)).free


def block_bytes(path: Path) -> int:
    """The allocation unit of the filesystem that will hold `path`: every file takes whole ones (4 KiB at least)."""
    try:
        return max(4096, os.statvfs(_existing(path)).f_frsize)
    except (AttributeError, OSError):  # no statvfs (Windows)
        return 4096


# Upper bounds of what one file costs beyond its data: zstd's and blosc's worst case on incompressible
# data (zstd adds about 1/256 plus a frame header, blosc 16 bytes), a directory entry, and a zarr.json.
_DIRENT = 64
_NODE_METADATA = 4096


def _chunk_file(nbytes: int, block: int) -> int:
    """Disk use of one chunk file holding `nbytes` before compression, in whole blocks, with its entry."""
    bound = nbytes + nbytes // 128 + 1024
    return -(-bound // block) * block + _DIRENT


def _chunked(grid: tuple[int, ...], chunk_bytes: int, sample_chunks: int, block: int) -> int:
    """Chunk files (and the folders zarr nests them in, `c/i/j/...`) of `sample_chunks` slices along axis 0
    of an array whose chunk grid is `grid` and whose chunks hold `chunk_bytes` each (edge chunks too)."""
    if sample_chunks == 0:
        return 0
    files = sample_chunks * math.prod(grid[1:])
    folders = 1 + sum(sample_chunks * math.prod(grid[1:i]) for i in range(1, len(grid)))  # c/ and c/i/...
    return files * _chunk_file(chunk_bytes, block) + folders * (block + _DIRENT)


def disk_bound(
    meta: StoreMeta,
    sample_chunks: int,
    *,
    create: bool,
    images_shape: tuple[int, int, int] | None = None,
    block: int = 4096,
) -> int:
    """An upper bound on the bytes of disk that writing `sample_chunks` sample chunks takes: every array's
    chunk files (activations, statistics, done, token_index, images) uncompressed plus the codecs' worst
    case, each rounded up to whole filesystem blocks, with the folders holding them; and with `create`,
    the metadata of every node and the arrays create_store fills (timesteps, seed, label, ...)."""
    lay = meta.layout()
    k, c, s = sample_chunks, lay.num_sample_chunks, lay.num_steps
    grid = (c, lay.num_step_chunks, lay.num_token_chunks, 1)
    act_chunk = math.prod(lay.act_chunks) * numpy_storage_dtype(meta.dtype).itemsize
    total = 0
    for _ in meta.act_names():
        total += _chunked(grid, act_chunk, k, block)
        total += _chunked((c, 1), s * 8, k, block)  # stats count
        total += 2 * _chunked((c, 1, 1), s * lay.d_model * 8, k, block)  # stats sum, sumsq
    total += _chunked((c,), lay.batch_size, k, block)  # done
    if meta.tokens.subsampled:
        total += _chunked(
            (c, lay.num_step_chunks, 1), lay.batch_size * lay.steps_per_chunk * lay.tokens * 4, k, block
        )
    if images_shape is not None:
        total += _chunked((c, 1, 1, 1), lay.batch_size * math.prod(images_shape), k, block)
    if create:
        names = meta.act_names()
        samples = 3 if meta.conditioning != "none" else 2  # seed, label or prompt_index, done
        # Every node but the root: a folder with a zarr.json (the stats group, timesteps, step_index, the
        # per-sample arrays, token_index, images, and per activation array itself, its stats group and 3 sums).
        nodes = 1 + 2 + samples + meta.tokens.subsampled + (images_shape is not None) + 5 * len(names)
        node = -(-_NODE_METADATA // block) * block + block + 2 * _DIRENT
        root = len(json.dumps(meta.model_dump(mode="json"))) + _NODE_METADATA
        total += block + -(-root // block) * block + nodes * node
        total += 2 * _chunked((1,), s * 8, 1, block)  # timesteps, step_index: one chunk each
        total += (samples - 1) * _chunked((c,), lay.batch_size * 8, c, block)  # seed, label / prompt_index
    return total
