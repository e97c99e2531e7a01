"""Recompute a store's per-step statistics with dask, out of core, optionally on a dask.distributed cluster.

The writer keeps, per (sample chunk, step), the row count and the per-channel sum and sum of squares of
what it wrote (store/writer.py); `Store.stats` turns them into per-step moments, which the trainer uses to
normalise. This module computes the same sums again from the activations themselves, one dask task per
chunk (nothing larger than a chunk in memory), to check the stored ones or to rebuild them. Chunks are read
as the trainer reads them, checksums verified: a missing or damaged chunk stops the computation with a
ChunkError rather than becoming part of statistics that a rewrite would then make look right. On a cluster (`scheduler="tcp://host:8786"`) the workers must see the store at the same path.

Shape key: C sample chunks, S stored steps, D model width.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import zarr
from tide.store.open import where, zarr_store
from tide.store.reader import (
    ChunkError,
    Store,
    StoreError,
    chunk_error,
    missing_problem,
    moments,
    read_into,
    read_rows,
)
from tide.store.remote import listed_sizes
from tide.store.schema import as_float
from tide.store.writer import everything
from zarr.core.sync import sync


class ChunkSums(NamedTuple):
    """The writer's statistics for some sample chunks, as stored under stats/<array>/."""

    chunks: list[int]
    """Sample chunks, in the order of the first axis below."""
    count: np.ndarray
    """(C, S) int64 rows summed."""
    sum: np.ndarray
    """(C, S, D) float64 per-channel sums."""
    sumsq: np.ndarray
    """(C, S, D) float64 per-channel sums of squares."""


def _chunk_sums(arr: zarr.Array, selection: tuple[slice, ...], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(sum (s, D), sumsq (s, D)) over the samples and tokens of one chunk, in float64.

    Read like the trainer reads it (store.reader.read_into): a chunk that is missing, fails its checksum or
    does not decode raises ChunkError instead of adding zeros or garbage to the sums.
    """
    shape = tuple(s.stop - s.start for s in selection[:3]) + (arr.shape[3],)
    block = np.empty(shape, dtype=arr.dtype)
    read_into(arr, selection, block)
    x = as_float(block, dtype).astype(np.float64)
    return x.sum(axis=(0, 2)), np.square(x).sum(axis=(0, 2))


def recompute_sums(
    store: Store, name: str, sample_chunks: list[int] | None = None, scheduler: str | None = None
) -> ChunkSums:
    """Count, sum and sum of squares per (sample chunk, step) of array `name`, over done (or the given) chunks.

    Raises ChunkError at the first chunk that is missing or unreadable, so that damage never becomes statistics.
    """
    import dask

    arr = store.array(name)  # names the arrays there are if `name` is not one of them
    lay, dtype = store.layout, store.meta.dtype
    chunks = store.done_chunks() if sample_chunks is None else list(sample_chunks)
    if not chunks:
        raise StoreError(f"{store.path} has no finished sample chunk to compute statistics over")
    missing = missing_chunks(store, name, chunks)
    if missing:  # named before anything is read; a version-1 store would read them as zeros
        more = f" (and {len(missing) - 1} more chunk files of {name})" if len(missing) > 1 else ""
        raise chunk_error(arr, missing[0], missing_problem(arr) + more)
    reads = lay.chunk_reads(chunks)
    tasks = [dask.delayed(_chunk_sums)(arr, r.selection, dtype) for r in reads]
    if scheduler is None:
        sums = dask.compute(*tasks, scheduler="threads")
    else:
        with _client(scheduler):
            sums = dask.compute(*tasks)
    position = {c: i for i, c in enumerate(chunks)}
    total = np.zeros((len(chunks), lay.num_steps, lay.d_model))
    sumsq = np.zeros_like(total)
    for r, (s, sq) in zip(reads, sums, strict=True):
        i, steps = position[r.chunk[0]], r.selection[1]
        total[i, steps] += s
        sumsq[i, steps] += sq
    rows = np.asarray([lay.sample_chunk(c).stop - lay.sample_chunk(c).start for c in chunks]) * lay.tokens
    count = np.repeat(rows[:, None], lay.num_steps, axis=1).astype(np.int64)
    return ChunkSums(chunks, count, total, sumsq)


def missing_chunks(store: Store, name: str, sample_chunks: list[int]) -> list[tuple[int, ...]]:
    """Chunks of `name` in `sample_chunks` whose files are not there."""
    arr = store.array(name)
    coords = [(*chunk, 0) for chunk in store.layout.chunks(sample_chunks)]
    prefix = f"{arr.path}/" if arr.path else ""
    listed = listed_sizes(arr)  # an object store: one listing instead of a HEAD request per chunk
    if listed is not None:
        return [c for c in coords if prefix + arr.metadata.encode_chunk_key(c) not in listed]
    return [c for c in coords if not sync(arr.store.exists(prefix + arr.metadata.encode_chunk_key(c)))]


def _client(address: str):
    try:
        distributed = importlib.import_module("distributed")
    except ImportError as e:
        raise StoreError(
            f"--scheduler {address} needs dask.distributed, which is not installed; `pip install distributed` "
            "(or leave out --scheduler to compute on this machine)"
        ) from e
    try:
        return distributed.Client(address, timeout="10s")
    except OSError as e:
        raise StoreError(
            f"no dask scheduler answered at {address}: {e}; start one with `dask scheduler`"
        ) from e


def stored_sums(store: Store, name: str, sample_chunks: list[int]) -> ChunkSums:
    """The writer's sums for `sample_chunks`."""
    g = store.root["stats"][name]
    return ChunkSums(
        list(sample_chunks), *(read_rows(g[stat], sample_chunks) for stat in ("count", "sum", "sumsq"))
    )


def damaged_sums(store: Store, name: str, sample_chunks: list[int]) -> list[ChunkError]:
    """The chunks of stats/<name> for `sample_chunks` that are missing or damaged (`write_sums` replaces
    them whole, without reading them)."""
    g, bad = store.root["stats"][name], []
    for stat in ("count", "sum", "sumsq"):
        for c in sample_chunks:
            try:
                read_rows(g[stat], [c])
            except ChunkError as e:
                bad.append(e)
    return bad


def difference(a: ChunkSums, b: ChunkSums) -> float:
    """Largest difference between two sets of sums, relative to the largest magnitude of each; inf if counts differ."""
    if a.chunks != b.chunks or not np.array_equal(a.count, b.count):
        return float("inf")
    return max(
        float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-300))
        for x, y in ((a.sum, b.sum), (a.sumsq, b.sumsq))
    )


def write_sums(store: Store, name: str, sums: ChunkSums) -> None:
    """Overwrite the stored sums of `sums.chunks` (opens the store for writing)."""
    g = zarr.open_group(zarr_store(where(store.path), "w"), path=f"stats/{name}", mode="r+", zarr_format=3)
    for i, c in enumerate(sums.chunks):  # whole chunks: a damaged one is replaced, never read
        everything(g["count"])[c] = sums.count[i]
        everything(g["sum"])[c] = sums.sum[i]
        everything(g["sumsq"])[c] = sums.sumsq[i]


def step_table(store: Store, sums: ChunkSums) -> list[dict[str, float]]:
    """One row per stored step: its timestep, rows, norm of the mean, RMS row norm, mean channel std."""
    m = moments(sums.count.sum(0), sums.sum.sum(0), sums.sumsq.sum(0))
    t = store.timesteps
    return [
        {
            "step": s,
            "t": float(t[s]),
            "rows": int(m.count[s]),
            "mean_norm": float(np.linalg.norm(m.mean[s])),
            "rms_norm": float(np.sqrt(m.mean_sq_norm[s])),
            "channel_std": float(np.sqrt(m.var[s]).mean()),
        }
        for s in range(len(t))
    ]


def check_sums(
    path: str, array: str | None, scheduler: str | None, write: bool, echo: Callable[[str], None] = print
) -> None:
    """`tide store stats`: recompute each array's sums, print its step table, and check them against the
    stored ones (or rewrite these with `write`); raises StoreError naming every array whose sums disagree."""
    from tide.store.reader import open_store

    store = open_store(path)
    mismatched = []
    for name in [array] if array else store.meta.act_names():
        sums = recompute_sums(store, name, scheduler=scheduler)
        echo(f"{name}: {len(sums.chunks)} sample chunks")
        echo(f"{'step':>5} {'t':>9} {'rows':>9} {'|mean|':>10} {'rms norm':>10} {'channel std':>12}")
        for r in step_table(store, sums):
            echo(
                f"{r['step']:>5} {r['t']:>9.2f} {r['rows']:>9} {r['mean_norm']:>10.4g} {r['rms_norm']:>10.4g} "
                f"{r['channel_std']:>12.4g}"
            )
        damaged = damaged_sums(
            store, name, sums.chunks
        )  # after the activations: what cannot be repaired first
        if write:
            write_sums(store, name, sums)
            why = (
                f"{len(damaged)} damaged chunk files among them were replaced: "
                + ", ".join(e.file for e in damaged)
                if damaged
                else f"they differed by {difference(sums, stored_sums(store, name, sums.chunks)):.3g} relative"
            )
            echo(f"{name}: rewrote the stored sums ({why})")
            continue
        if damaged:
            raise damaged[0]
        diff = difference(sums, stored_sums(store, name, sums.chunks))
        if diff > 1e-9:
            mismatched.append(f"{name} (relative difference {diff:.3g})")
        else:
            echo(f"{name}: stored sums match (relative difference {diff:.3g})")
    if mismatched:
        raise StoreError(
            f"stored sums disagree with the activations for {', '.join(mismatched)}; {_why(store, path)}"
        )


def _why(store: Store, path: str) -> str:
    """What to do about stored sums that disagree: stores since version 2 have checksums on the activations,
    version 1 ones do not."""
    if store.meta.format_version >= 2:
        return "every chunk passed its checksum, so the stored sums are at fault: rewrite them with --write"
    return (
        f"this version-1 store has no checksums, so damaged activations could explain it too: run "
        f"`tide store verify {path}`, and rewrite the sums with --write only if it finds nothing else"
    )
