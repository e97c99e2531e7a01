"""Integrity checks of a tide store (`tide store verify`).

verify names every chunk of a done sample that is missing or damaged by its file, so that it can be
restored, or its samples reset (`reset_damaged`) and harvested again.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import zarr
from tide.store.open import where, zarr_store
from tide.store.reader import (
    ChunkError,
    Store,
    _store_root,
    checksummed,
    chunk_error,
    chunk_file,
    missing_problem,
    open_store,
    read_into,
)
from tide.store.remote import RangeFile, key_size, listed_sizes
from tide.store.schema import (
    ACT_DIMS,
    CHECKSUM_BYTES,
    Layout,
    as_float,
    chunk_region,
    chunk_size_bounds,
    chunks_touched,
)


class Verdict(NamedTuple):
    """What `verify` found."""

    problems: list[str]
    """Every problem, as a sentence; empty when the store is sound."""
    damaged: list[ChunkError]
    """The chunks among the problems that are missing or unreadable, with the samples each holds."""
    samples_done: int
    num_samples: int
    """samples_done < num_samples: a sound store whose harvest has not finished (or was interrupted)."""


def verify(path: Path | str, check_values: bool = True) -> Verdict:
    """Every problem found in a store. Every chunk of every done sample must exist with a plausible size;
    with check_values, each is also read (checksum, decoding), checked for non-finite values, and summed
    against the writer's statistics."""
    try:
        store = open_store(path)
    except ValueError as e:
        return Verdict([str(e)], [], 0, 0)
    problems: list[str] = []
    meta, lay, root = store.meta, store.layout, store.root
    expected = {
        "timesteps": (lay.num_steps,),
        "step_index": (lay.num_steps,),
        "seed": (lay.num_samples,),
        "done": (lay.num_samples,),
    }
    expected["label" if meta.conditioning == "class" else "prompt_index"] = (lay.num_samples,)
    if meta.tokens.subsampled:
        expected["token_index"] = (lay.num_samples, lay.num_steps, lay.tokens)
    for name in meta.act_names():
        expected[name] = lay.act_shape
    for name, shape in expected.items():
        if name not in root:
            problems.append(f"array {name} is missing")
        elif root[name].shape != shape:
            problems.append(f"array {name} has shape {root[name].shape}, expected {shape}")
    done = store.done()
    if problems:
        return Verdict(problems, [], int(done.sum()), lay.num_samples)
    if list(root["step_index"][:]) != meta.step_indices:
        problems.append("step_index disagrees with the metadata's step_indices")
    done_chunks = store.done_chunks()
    damaged: list[ChunkError] = []
    data = [*meta.act_names(), *(["token_index"] if meta.tokens.subsampled else [])]
    for name in data:
        arr = root[name]
        if name != "token_index" and tuple(arr.metadata.dimension_names or ()) != ACT_DIMS:
            problems.append(
                f"{name} has dimension_names {arr.metadata.dimension_names}, expected {list(ACT_DIMS)}"
            )
        found, sound = _check_files(arr, meta.codec, lay, done_chunks)
        if check_values:
            found += _check_values(store, name, sound, problems, compare_stats=not found)
        damaged += found
    problems += [f"{e.where} {e.problem}" for e in damaged]
    return Verdict(problems, damaged, int(done.sum()), lay.num_samples)


def _chunks_of(arr: zarr.Array, lay: Layout, sample_chunks: list[int]) -> list[tuple[int, ...]]:
    """Every chunk of `arr` that holds samples of the given sample chunks."""
    grid = arr.metadata.chunk_grid.chunk_shape
    full = tuple(slice(None) for _ in arr.shape[1:])
    return [
        coords
        for c in sample_chunks
        for coords in chunks_touched((lay.sample_chunk(c), *full), arr.shape, grid)
    ]


def _check_files(
    arr: zarr.Array, codec: str, lay: Layout, sample_chunks: list[int]
) -> tuple[list[ChunkError], list[tuple[int, ...]]]:
    """(chunks missing, of an impossible size, or whose compressed frame's header disagrees with the file's
    size, the others): a few bytes of each file, nothing decoded."""
    grid = arr.metadata.chunk_grid.chunk_shape
    raw = math.prod(grid) * np.dtype(arr.dtype).itemsize  # an edge chunk is stored whole too
    trailer = CHECKSUM_BYTES if checksummed(arr) else 0
    smallest, largest = chunk_size_bounds(raw, codec, bool(trailer))
    bad, sound = [], []
    sizes = listed_sizes(arr)
    for coords in _chunks_of(arr, lay, sample_chunks):
        try:
            with _open_chunk(arr, coords, sizes) as (f, size):
                if not smallest <= size <= largest:
                    want = f"{smallest}" if smallest == largest else f"{smallest} to {largest}"
                    problem = f"has {size} bytes, expected {want} (truncated or overwritten)"
                else:
                    problem = _frame_problem(f, codec, raw, size - trailer)
        except FileNotFoundError:
            problem = missing_problem(arr)
        if problem:
            bad.append(chunk_error(arr, coords, problem))
        else:
            sound.append(coords)
    return bad, sound


@contextmanager
def _open_chunk(
    arr: zarr.Array, coords: tuple[int, ...], sizes: dict[str, int] | None
) -> Iterator[tuple[Any, int]]:
    """(the chunk's bytes as a file, its size), read lazily: the file of a local store; for a remote or zip
    store, byte ranges requested as they are read, so that checking a header downloads only the header.
    The size comes from `sizes` (a listing) when given. FileNotFoundError when the chunk is not there."""
    file = chunk_file(arr, coords)
    if _store_root(arr) is None:
        size = sizes.get(file) if sizes is not None else key_size(arr.store, file)
        if size is None:
            raise FileNotFoundError(file)
        yield RangeFile(arr.store, file, size), size
        return
    with open(file, "rb") as f:
        yield f, os.fstat(f.fileno()).st_size


def _frame_problem(f: BinaryIO, codec: str, raw: int, payload: int) -> str | None:
    """Whether the header of a compressed chunk agrees with the file: the sizes it records (blosc), or the
    blocks it chains (zstd), must end where the payload ends. Catches a truncated file without decoding it."""
    if codec == "blosc-zstd":
        head = f.read(16)
        if len(head) < 16:
            return f"has {len(head)} bytes, fewer than a blosc header"
        nbytes, _, cbytes = struct.unpack("<III", head[4:16])
        if nbytes != raw:
            return f"has a blosc header for {nbytes} bytes of values, expected {raw}"
        if cbytes != payload:
            return f"has {payload} bytes of blosc frame, its header says {cbytes} (truncated or overwritten)"
    elif codec == "zstd":
        try:
            content, length = _zstd_frame(f)
        except ValueError as e:
            return f"is not a whole zstd frame ({e})"
        if content is not None and content != raw:
            return f"has a zstd frame of {content} bytes of values, expected {raw}"
        if length != payload:
            return (
                f"has {payload} bytes of zstd frame, its blocks add up to {length} (truncated or overwritten)"
            )
    return None


def _zstd_frame(f) -> tuple[int | None, int]:
    """(content size if recorded, length) of the zstd frame at the start of `f`, from its block headers
    (RFC 8878, section 3.1.1)."""
    head = f.read(18)
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        raise ValueError("no zstd magic number")
    fhd = head[4]
    single, fcs_flag, dict_flag = fhd >> 5 & 1, fhd >> 6, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    content = int.from_bytes(head[pos : pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
    pos += fcs_len
    while True:
        f.seek(pos)
        block = f.read(3)
        if len(block) < 3:
            raise ValueError(f"it ends inside a block header at byte {pos}")
        h = int.from_bytes(block, "little")
        kind, size = h >> 1 & 3, h >> 3
        if kind == 3:
            raise ValueError(f"reserved block type at byte {pos}")
        pos += 3 + (1 if kind == 1 else size)
        if h & 1:
            break
    return (content if fcs_len else None), pos + (4 if fhd >> 2 & 1 else 0)


def _check_values(
    store: Store, name: str, chunks: list[tuple[int, ...]], problems: list[str], compare_stats: bool
) -> list[ChunkError]:
    """Read each chunk as the trainer does; name non-finite values and compare sums with stats/<name>.

    Returns the chunks that could not be read. The sums are compared only when `chunks` are all the done
    chunks (compare_stats) and every one was read: damage is named as such, not as disagreeing statistics.
    """
    meta, lay = store.meta, store.layout
    arr = store.root[name]
    grid = arr.metadata.chunk_grid.chunk_shape
    bad: list[ChunkError] = []
    count = np.zeros(lay.num_steps, dtype=np.int64)
    total = np.zeros((lay.num_steps, lay.d_model))
    for coords in chunks:
        region = chunk_region(coords, arr.shape, grid)
        block = np.empty(tuple(r.stop - r.start for r in region), dtype=arr.dtype)
        try:
            read_into(arr, region, block)
        except ChunkError as e:
            bad.append(e)
            continue
        if name == "token_index":
            if block.min() < 0 or block.max() >= meta.tokens.num_tokens:
                problems.append(
                    f"token_index holds positions outside the image's tokens in samples {region[0]}"
                )
            continue
        values = as_float(block, meta.dtype)
        if not np.isfinite(values).all():
            i, s = np.argwhere(~np.isfinite(values))[0][:2]
            problems.append(
                f"{name}: non-finite value at sample {region[0].start + i}, step {region[1].start + s}"
            )
        x = values.astype(np.float64)
        count[region[1]] += x.shape[0] * x.shape[2]
        total[region[1]] += x.sum(axis=(0, 2))
    if name != "token_index" and compare_stats and not bad:
        stats = store.stats(name, store.done_chunks())
        if not np.array_equal(stats.count, count) or not np.allclose(
            stats.mean * count[:, None], total, rtol=1e-6, atol=1e-6
        ):
            problems.append(f"stats/{name} disagree with the stored activations")
    return bad


def reset_damaged(path: Path | str, damaged: list[ChunkError]) -> list[slice]:
    """Mark the samples of damaged chunks not done, so that re-running the store's harvest command writes
    them again (a harvest redoes every sample chunk that is not done). Returns the sample ranges reset."""
    ranges = sorted({(e.samples.start, e.samples.stop) for e in damaged if e.samples is not None})
    done = zarr.open_array(zarr_store(where(path), "w"), path="done", mode="r+", zarr_format=3)
    for start, stop in ranges:
        done[start:stop] = np.zeros(stop - start, dtype=bool)
    return [slice(a, b) for a, b in ranges]


def verdict_advice(path: str, verdict: Verdict, quick: bool, reset: list[slice] | None) -> list[str]:
    """What `tide store verify` says after its FAIL lines: the next step for damage (or what --reset-damaged
    did), or that the store is sound and, if so, whether its harvest is finished."""
    if reset is not None:
        samples = ", ".join(f"{r.start}..{r.stop - 1}" for r in reset)
        return [
            f"marked samples {samples} not done; run the `tide harvest --out {path}` command that made this "
            "store again to write them anew, then verify again"
        ]
    if verdict.damaged:
        return [
            f"{len(verdict.damaged)} chunk(s) are missing or unreadable: restore them from a copy of the store, "
            f"or run `tide store verify {path} --reset-damaged` and then the store's `tide harvest --out "
            f"{path}` command again to write their samples anew"
        ]
    if verdict.problems:
        return []
    lines = [
        f"ok: {path} is a sound tide store as far as --quick checks (metadata, shapes, and every chunk file "
        "of the done samples there with a plausible size); without --quick every chunk is also read and "
        "its checksum verified"
        if quick
        else f"ok: {path} is a sound tide store"
    ]
    if verdict.samples_done < verdict.num_samples:
        lines.append(
            f"incomplete: {verdict.samples_done} of {verdict.num_samples} samples done; re-run the same "
            f"`tide harvest --out {path}` command to finish it (finished samples are kept)"
        )
    return lines
