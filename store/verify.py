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
from tide.store.pack import unsafe_entries
from tide.store.reader import (
    ChunkError,
    Store,
    StoreError,
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
    as_float,
    chunk_region,
    chunk_size_bounds,
    chunks_touched,
)
from tide.store.writer import everything


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
    """Every problem found in a store. Every chunk that must exist (every chunk of every checksummed array,
    as format version 3 writes them; of the activations, token_index, images and stats, those of done
    samples) must be there with a plausible size; with check_values, each is also read (checksum,
    decoding), activations are checked for non-finite values and summed against the writer's statistics."""
    try:
        store = open_store(path)
    except ValueError as e:
        return Verdict([str(e)], [], 0, 0)
    lay = store.layout
    shape_problems = _shape_problems(store)
    problems = unsafe_entries(path) + shape_problems
    if shape_problems:
        return Verdict(problems, [], 0, lay.num_samples)
    done, damaged = _done_flags(store)
    done_chunks = [c for c in range(lay.num_sample_chunks) if done[lay.sample_chunk(c)].all()]
    for name in _arrays(store):
        arr = store.root[name]
        found, sound = _check_files(arr, _required(store, arr, done_chunks))
        if check_values:
            stats_sound = not any(e.where.startswith(f"stats/{name}/") for e in damaged)
            found += _check_values(
                store, name, sound, problems, done_chunks if stats_sound and not found else None
            )
        damaged += found
    if not any(e.where.startswith("step_index:") for e in damaged):
        try:
            if list(store.read("step_index")) != store.meta.step_indices:
                problems.append("step_index disagrees with the metadata's step_indices")
        except ChunkError as e:  # a store before version 3: no checksum, so only decoding tells
            damaged.append(e)
    problems += [f"{e.where} {e.problem}" for e in damaged]
    return Verdict(problems, damaged, int(done.sum()), lay.num_samples)


def _arrays(store: Store) -> list[str]:
    """Every array of the store but `done`, the statistics before the activations they sum."""
    meta = store.meta
    names = ["timesteps", "step_index", "seed"]
    names += {"class": ["label"], "prompt": ["prompt_index"]}.get(meta.conditioning, [])
    names += [f"stats/{n}/{s}" for n in meta.act_names() for s in ("count", "sum", "sumsq")]
    names += ["images"] if "images" in store.root else []
    names += ["token_index"] if meta.tokens.subsampled else []
    return names + meta.act_names()


def _shape_problems(store: Store) -> list[str]:
    """Arrays the metadata implies that are not there, or not of the shape it implies."""
    meta, lay = store.meta, store.layout
    n, s, c = lay.num_samples, lay.num_steps, lay.num_sample_chunks
    expected = {"timesteps": (s,), "step_index": (s,), "seed": (n,), "done": (n,)}
    expected |= {"label": (n,)} if meta.conditioning == "class" else {}
    expected |= {"prompt_index": (n,)} if meta.conditioning == "prompt" else {}
    expected |= {"token_index": (n, s, lay.tokens)} if meta.tokens.subsampled else {}
    for name in meta.act_names():
        expected |= {name: lay.act_shape, f"stats/{name}/count": (c, s)}
        expected |= {f"stats/{name}/{stat}": (c, s, lay.d_model) for stat in ("sum", "sumsq")}
    problems = []
    for name, shape in expected.items():
        if name not in store.root:
            problems.append(f"array {name} is missing")
        elif store.root[name].shape != shape:
            problems.append(f"array {name} has shape {store.root[name].shape}, expected {shape}")
    if "images" in store.root and store.root["images"].shape[0] != n:
        problems.append(f"array images has {store.root['images'].shape[0]} samples, expected {n}")
    for name in meta.act_names():
        dims = tuple(store.root[name].metadata.dimension_names or ()) if name in store.root else ACT_DIMS
        if dims != ACT_DIMS:
            problems.append(f"{name} has dimension_names {list(dims)}, expected {list(ACT_DIMS)}")
    return problems


def _done_flags(store: Store) -> tuple[np.ndarray, list[ChunkError]]:
    """(the done flags, the chunks of `done` that are missing or damaged); the samples of a damaged chunk
    count as not done, so that the rest of the store is still checked."""
    arr = store.root["done"]
    if not checksummed(arr):  # before version 3: a missing chunk of `done` is samples not done yet
        return store.done(), []
    grid = arr.metadata.chunk_grid.chunk_shape
    damaged, sound = _check_files(arr, chunks_touched((slice(None),), arr.shape, grid))
    done = np.zeros(arr.shape, dtype=bool)
    for coords in sound:
        region = chunk_region(coords, arr.shape, grid)
        try:
            read_into(arr, region, done[region])
        except ChunkError as e:
            damaged.append(e)
    return done, damaged


def _required(store: Store, arr: zarr.Array, done_chunks: list[int]) -> list[tuple[int, ...]]:
    """The chunks of `arr` that must exist: of a checksummed array (format version 3 writes every chunk),
    every chunk of the per-step and per-sample arrays and the done sample chunks' of the others; of an
    activation array or token_index, the done sample chunks' whatever its version (a version-1 store's
    missing ones are named with what they may mean)."""
    grid = arr.metadata.chunk_grid.chunk_shape
    dims = tuple(arr.metadata.dimension_names or ())
    lay = store.layout
    if not (checksummed(arr) or arr.path in store.meta.act_names() or arr.path == "token_index"):
        return []
    if dims[0] == "step" or arr.path in ("seed", "label", "prompt_index"):
        return chunks_touched(tuple(slice(None) for _ in arr.shape), arr.shape, grid)
    rows = [lay.sample_chunk(c) for c in done_chunks]
    if dims[0] == "sample_chunk":
        rows = [slice(c, c + 1) for c in done_chunks]
    rest = tuple(slice(None) for _ in arr.shape[1:])
    return [coords for r in rows for coords in chunks_touched((r, *rest), arr.shape, grid)]


def _codec(arr: zarr.Array) -> str:
    """The compressor of `arr`'s chunks, named as on the harvest command line (any blosc frame is checked
    alike)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    for c in arr.metadata.codecs:
        if isinstance(c, BloscCodec):
            return "blosc-zstd"
        if isinstance(c, ZstdCodec):
            return "zstd"
    return "none"


def _check_files(
    arr: zarr.Array, chunks: list[tuple[int, ...]]
) -> tuple[list[ChunkError], list[tuple[int, ...]]]:
    """(chunks missing, of an impossible size, or whose compressed frame's header disagrees with the file's
    size, the others): a few bytes of each file, nothing decoded."""
    grid = arr.metadata.chunk_grid.chunk_shape
    raw = math.prod(grid) * np.dtype(arr.dtype).itemsize  # an edge chunk is stored whole too
    trailer = CHECKSUM_BYTES if checksummed(arr) else 0
    codec = _codec(arr)
    smallest, largest = chunk_size_bounds(raw, codec, bool(trailer))
    bad, sound = [], []
    sizes = listed_sizes(arr) if chunks else None
    for coords in chunks:
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
    store: Store, name: str, chunks: list[tuple[int, ...]], problems: list[str], stats_of: list[int] | None
) -> list[ChunkError]:
    """Read each chunk as the trainer does (checksum, decoding); name non-finite activations or timesteps and
    token positions outside the image, and compare an activation array's sums with stats/<name> over the
    sample chunks `stats_of` (None: not compared, because its statistics or some of its chunks are damaged:
    damage is named as such, not as disagreeing statistics).

    Returns the chunks that could not be read."""
    meta, lay = store.meta, store.layout
    arr = store.root[name]
    grid = arr.metadata.chunk_grid.chunk_shape
    activations = name in meta.act_names()
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
        if name == "token_index" and (block.min() < 0 or block.max() >= meta.tokens.num_tokens):
            problems.append(f"token_index holds positions outside the image's tokens in samples {region[0]}")
        if name == "timesteps" and not np.isfinite(block).all():
            problems.append(f"timesteps holds a non-finite value at steps {region[0]}")
        if not activations:
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
    if activations and stats_of is not None and not bad:
        try:
            stats = store.stats(name, stats_of)
        except ChunkError as e:  # a store before version 3: its statistics have no checksum to check first
            return [e]
        if not np.array_equal(stats.count, count) or not np.allclose(
            stats.mean * count[:, None], total, rtol=1e-6, atol=1e-6
        ):
            problems.append(f"stats/{name} disagree with the stored activations")
    return bad


def check_resettable(path: Path | str) -> None:
    """Refuse --reset-damaged where the done flags cannot be rewritten: a store tide only reads."""
    loc = where(path)
    if not loc.writable:
        kind = {"zip": "a packed .zip store", "hf": "a Hugging Face dataset"}.get(
            loc.scheme, f"a store at an {loc.scheme}:// URL"
        )
        raise StoreError(
            f"--reset-damaged rewrites the done flags of {loc.text}, but it is {kind}, which tide only reads: "
            "run `tide store verify --reset-damaged` on the copy it was made from (a folder, s3:// or gs://), "
            "then that store's `tide harvest` command, and share it again"
        )


def reset_damaged(path: Path | str, damaged: list[ChunkError]) -> list[slice]:
    """Mark the samples of damaged chunks not done, so that re-running the store's harvest command writes
    them again (a harvest redoes every sample chunk that is not done). Returns the sample ranges reset."""
    check_resettable(path)
    ranges = sorted({(e.samples.start, e.samples.stop) for e in damaged if e.samples is not None})
    done = everything(zarr.open_array(zarr_store(where(path), "w"), path="done", mode="r+", zarr_format=3))
    for start, stop in ranges:  # whole chunks of `done`: a damaged one is replaced, never read
        done[start:stop] = np.zeros(stop - start, dtype=bool)
    return [slice(a, b) for a, b in ranges]


def verdict_advice(path: str, verdict: Verdict, quick: bool, reset: list[slice] | None) -> list[str]:
    """What `tide store verify` says after its FAIL lines: the next step for damage (or what --reset-damaged
    did), or that the store is sound and, if so, whether its harvest is finished. Each damaged chunk is
    mended its own way: a harvest rewrites the samples' arrays, `store stats --write` the sums, and only a
    copy of the store the arrays written once (timesteps, step_index)."""
    once = sorted({e.where.split(":")[0] for e in verdict.damaged if e.samples is None})
    lines = [
        f"{', '.join(once)} cannot be written again by tide (they are written once, when the store is created): "
        "restore their damaged chunk files from a copy of the store"
    ] if once else []  # fmt: skip
    if any(e.where.startswith("stats/") for e in verdict.damaged):
        lines.append(
            f"`tide store stats {path} --write` rewrites the damaged stats/ chunks from the activations"
        )
    if reset:
        samples = ", ".join(f"{r.start}..{r.stop - 1}" for r in reset)
        return [
            *lines,
            f"marked samples {samples} not done; run the `tide harvest --out {path}` command that made this "
            "store again to write them anew, then verify again",
        ]
    if any(e.samples is not None for e in verdict.damaged):
        lines.append(
            f"{len(verdict.damaged)} chunk(s) are missing or unreadable: restore them from a copy of the store, "
            f"or run `tide store verify {path} --reset-damaged` and then the store's `tide harvest --out "
            f"{path}` command again to write their samples anew"
        )
    if verdict.problems:
        return lines
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
