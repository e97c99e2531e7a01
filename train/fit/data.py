"""Stream shuffled (x, t) batches of activation rows from a tide store, reproducibly and resumably.

Shape key: A activation arrays read together, R rows of a window, B batch rows, D model width, S stored steps.

An epoch is one pass over the training split's chunks (whole chunks of the store, so every read is one
decompression of contiguous data), laid out as a stream of rows:
  1. the chunks, cut to the step range, are put in a seeded random order;
  2. consecutive chunks are grouped into ceil(rows / window_rows) windows of near-equal size (cut at chunk
     boundaries, so a window exceeds window_rows by less than a chunk);
  3. each window's rows are permuted; the stream is the windows' permuted rows, one after another;
  4. batches are consecutive `batch_size` slices of the stream (a batch may straddle two windows).
So every row of the split is in the stream exactly once per epoch, and a batch mixes samples, steps and
tokens from every chunk of its window. The randomness of epoch e is drawn from generators keyed by
(seed, e) for the chunk order and (seed, e, window) for a window's permutation, so a position in the data
is just `Position(epoch, rows consumed)`: a resumed run re-reads the one window it stopped in, permutes it
identically and skips the rows already trained on. The order is computed on the CPU and only applied on
the device, so it is the same on every device.

Stratified by step (`stratify_steps=True`): windows are made of whole sample chunks (each with all of its
step and token chunks), so a window holds every stored step of its samples, and within a window each
step's rows are spread evenly over the stream (systematic sampling): any B consecutive rows hold each of
the window's steps in proportion to its share of the window, to within one row. Without it the share of a
step in a batch varies with which chunks landed in the window.

Reading: a background thread reads the next windows while batches are drawn from the current one; each
window's chunks are read by a thread pool (store.reader.chunk_values). On CPU each read thread maps an
uncompressed chunk's file (or decodes a compressed one into a small scratch buffer), checks its crc32c, and
scatters its rows straight to their shuffled places in the window's own arrays, so the chunk's bytes are
copied once and the shuffle is no extra pass, and a batch is a slice (no copy and no torch op on the
training thread). On CUDA chunks are decoded in order into a pinned buffer, copied with
non_blocking=True, and permuted on the device. The background thread plans the next window (its
permutation and where each chunk's rows go: a serial pass over its rows, 5% to 11% of the window's reading
CPU) while the read threads read this one, and queues its chunks behind this one's before waiting for this
one, so the read threads go from window to window without a pause.

A "chunks consumed" count and a saved RNG state would say the same as Position: the chunks consumed are
those of the windows before `rows`, and every generator is re-made from (seed, epoch, window).

Shares (`tide train` on N ranks, train/fit/distributed.py): the stream above is the same whatever N is.
Each window's chunks are dealt to the ranks (in the window's seeded order, each to the rank with the fewest
rows so far), and a rank reads only its own. The permutation is computed from the chunks' indices alone, so
every rank knows where each of its rows lands in the stream; its share of a batch is its rows among the
batch's stream positions. The ranks' shares of batch j are batch j of one process, split: N ranks train on
the same batches as one process, and a run resumed on another number of ranks goes on with the same data.
A share's size varies around B / N from batch to batch (by about sqrt(B / N) rows, more when a window's
chunks cannot be dealt evenly); the trainer's batch-wide sums do not care.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from tide.store.reader import Store, StoreError, chunk_values, default_read_threads, read_into
from tide.store.remote import Fetches, fetch_ahead
from tide.store.schema import ChunkRead, Layout, numpy_storage_dtype, row_index, torch_storage_dtypes
from torch import Tensor


class Split(BaseModel):
    """Which sample chunks (whole harvest batches of images) train and which are held out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    val_fraction: float
    """Requested fraction of the store's sample chunks held out."""
    split_seed: int
    """Seed of the held-out choice."""
    train_chunks: list[int]
    """Done sample chunks trained on."""
    val_chunks: list[int]
    """Done sample chunks held out (evaluation only)."""

    def val_samples(self, layout: Layout) -> list[list[int]]:
        """Held-out samples as [start, stop) ranges."""
        return [[layout.sample_chunk(c).start, layout.sample_chunk(c).stop] for c in self.val_chunks]


def split_samples(layout: Layout, done_chunks: Sequence[int], val_fraction: float, split_seed: int) -> Split:
    """Hold out round(val_fraction * C) sample chunks (at least one when val_fraction > 0), chosen by seed.

    The choice is made over all C chunks of the store, not over the done ones, so that a store that is still
    being harvested keeps its held-out samples as it grows. When none of them is done yet (a harvest stopped
    early) and two or more chunks are, the done chunk that comes first in the same seeded order is held out
    as well, so that a partial store still has samples to evaluate on.
    """
    n = layout.num_sample_chunks
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    order = np.random.default_rng([split_seed, 7]).permutation(n).tolist()
    held = set(order[:n_val])
    done = set(done_chunks)
    if n_val and len(done) >= 2 and not held & done:
        held.add(next(c for c in order if c in done))
    train = [c for c in done_chunks if c not in held]
    val = [c for c in done_chunks if c in held]
    if not train:
        raise ValueError(
            f"no sample chunk is left to train on: the store has {len(done_chunks)} done of {n} sample chunks and "
            f"val_fraction={val_fraction} holds out {n_val}; harvest more samples or lower --val-fraction"
        )
    return Split(val_fraction=val_fraction, split_seed=split_seed, train_chunks=train, val_chunks=val)


class Position(NamedTuple):
    """Where a loader is in its data: the next row to yield is row `rows` of epoch `epoch`'s stream."""

    epoch: int
    """Epochs count from 0; each has its own chunk order and permutations."""
    rows: int
    """Rows of this epoch's stream already yielded (a batch boundary)."""


class Batch(NamedTuple):
    x_ABD: Tensor
    """Raw activations in the store's dtype (float16, bfloat16 or float32), one slice per loader array."""
    t_B: Tensor
    """The scheduler's timestep value of each row (float32)."""
    step_B: Tensor
    """Stored step position of each row (int64), an index into the store's `timesteps`."""
    sample_B: Tensor
    """Sample index of each row (int64)."""
    position: Position
    """The loader's position after this batch: resume from here to continue with the next one."""
    global_rows: int | None = None
    """Rows of the whole batch, every rank's share together (None: len(t_B), this process holds them all)."""


class Window(NamedTuple):
    """Chunks read and permuted together."""

    index: int
    """Position in the epoch's plan; with (seed, epoch) it keys the window's permutation."""
    reads: list[ChunkRead]
    start: int
    """Offset of the window's first row in the epoch's stream."""
    rows: int


class _Loaded(NamedTuple):
    """A window read by the producer. On CPU it arrives permuted (order_R None) in buffers of its own; on
    CUDA it stays in its pinned slot and order_R is applied on the device."""

    epoch: int
    window: Window
    x_ARD: Tensor
    step_R: Tensor
    sample_R: Tensor
    order_R: Tensor | None
    slot: int
    positions_R: np.ndarray | None
    """Stream positions (in the window) of this rank's rows, ascending; None when it holds every row."""


class _Planned(NamedTuple):
    """A window's rows, planned before it is read: where each read's rows go, and each row's step and sample
    (in stream order on CPU; in read order, with order_R, on CUDA)."""

    epoch: int
    window: Window
    mine: Window
    """The reads this rank makes (the whole window on one rank)."""
    rows: list[slice | np.ndarray]
    """Where read i's rows land in the window's array."""
    step_R: np.ndarray
    sample_R: np.ndarray
    order_R: np.ndarray | None
    positions_R: np.ndarray | None


class _Pending(NamedTuple):
    """A window whose chunks are queued on the read threads."""

    jobs: list[Future]
    loaded: _Loaded
    """What the consumer gets once every job is done."""

    def result(self) -> _Loaded:
        for job in self.jobs:
            job.result()  # raises a read's error (a damaged chunk names its file)
        return self.loaded


class _Slot:
    """A preallocated window buffer: rows of every array, with each row's step and sample (empty on CPU,
    where every window gets arrays of its own)."""

    def __init__(self, num_arrays: int, rows: int, d: int, dtype: torch.dtype, pin: bool):
        self.x_ARD = torch.empty((num_arrays, rows, d), dtype=dtype, pin_memory=pin)
        self.step_R = torch.empty(rows, dtype=torch.int64, pin_memory=pin)
        self.sample_R = torch.empty(rows, dtype=torch.int64, pin_memory=pin)
        self.order_R = torch.empty(rows, dtype=torch.int64, pin_memory=pin)
        """The window's permutation, pinned too: a copy from pageable memory is not asynchronous."""
        self.ready: torch.cuda.Event | None = None
        """Set on CUDA: the copy out of this slot that must finish before it is refilled."""


def _span(positions_R: np.ndarray | None, lo: int, hi: int) -> tuple[int, int]:
    """A rank's rows at stream positions [lo, hi) of a window, as a range of its own rows (the same range
    when it holds every row)."""
    if positions_R is None:
        return lo, hi
    first, end = np.searchsorted(positions_R, [lo, hi])
    return int(first), int(end)


def _pairs(items: Iterator) -> Iterator[tuple[Any, Any]]:
    """(item, the item after it or None) for each item."""
    current = next(items, None)
    while current is not None:
        following = next(items, None)
        yield current, following
        current = following


class ActivationLoader:
    """Shuffled batches of rows of one or more activation arrays of a store (rows aligned across arrays).

    Several arrays (layers, sites) are read together so that SAEs on each can share one pass; several SAEs
    on one array simply share its batches.
    """

    def __init__(
        self,
        store: Store,
        arrays: Sequence[str],
        sample_chunks: Sequence[int],
        batch_size: int,
        *,
        window_rows: int = 1 << 17,
        seed: int = 0,
        shuffle: bool = True,
        stratify_steps: bool = False,
        step_range: tuple[int, int] | None = None,
        drop_last: bool = True,
        read_threads: int | None = None,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
        source: Sequence[np.ndarray] | None = None,
        rank: int = 0,
        ranks: int = 1,
    ):
        """`read_threads`: default one per core (store.reader.default_read_threads). `source`: numpy arrays
        (e.g. memmaps) shaped and typed like the store's arrays, read instead of the Zarr arrays; used to
        measure the store's cost against raw memory. `rank` of `ranks`: read only this rank's share of every
        window and yield its share of every batch (see the module docstring)."""
        if not 0 <= rank < ranks:
            raise ValueError(f"rank={rank} must be in 0..{ranks - 1} (ranks={ranks})")
        self.rank, self.ranks = rank, ranks
        self.store, self.layout, self.arrays = store, store.layout, list(arrays)
        self._zarr = [store.array(n) for n in self.arrays]
        self._source = list(source) if source is not None else None
        self.batch_size, self.window_rows, self.seed = batch_size, window_rows, seed
        self.shuffle, self.stratify_steps, self.drop_last = shuffle, stratify_steps, drop_last
        self.read_threads = read_threads or default_read_threads()
        self.prefetch, self.device = prefetch, torch.device(device)
        self.step_range = step_range or (0, self.layout.num_steps)
        self.reads = self.layout.chunk_reads(list(sample_chunks), self.step_range)
        if not self.reads:
            raise ValueError(f"no rows to read: sample chunks {list(sample_chunks)}, steps {self.step_range}")
        self.rows_per_epoch = sum(r.rows for r in self.reads)
        self._max_chunk_rows = max(r.rows for r in self.reads)
        self._recycled: list[np.ndarray] = []
        self.timesteps_S = torch.as_tensor(store.timesteps, dtype=torch.float32).to(self.device)
        self._dtype, self._view = torch_storage_dtypes(store.meta.dtype)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.rows_per_epoch, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def _units(self) -> list[list[ChunkRead]]:
        """What a window is made of: single chunks, or (stratified) every chunk of one sample chunk."""
        if not self.stratify_steps:
            return [[r] for r in self.reads]
        by_chunk: dict[int, list[ChunkRead]] = {}
        for r in self.reads:
            by_chunk.setdefault(r.chunk[0], []).append(r)
        return list(by_chunk.values())

    def plan(self, epoch: int) -> list[Window]:
        """The windows of epoch `epoch`, in stream order."""
        units = self._units()
        if self.shuffle:
            rng = np.random.default_rng([self.seed, 1, epoch])
            units = [
                [units[j][i] for i in rng.permutation(len(units[j]))] for j in rng.permutation(len(units))
            ]
        # Equal shares of the epoch's rows, cut between units, so that no window is a small remainder.
        n = math.ceil(self.rows_per_epoch / self.window_rows)
        windows: list[Window] = []
        cur: list[ChunkRead] = []
        start = done = 0
        for unit in units:
            cur += unit
            done += sum(r.rows for r in unit)
            if done * n >= (len(windows) + 1) * self.rows_per_epoch:
                windows.append(Window(len(windows), cur, start, done - start))
                cur, start = [], done
        return windows

    def deal(self, window: Window) -> list[int]:
        """The rank that reads each of a window's reads: in the window's order, each goes to the rank with the
        fewest rows so far (the lowest such rank on a tie)."""
        rows, owner = [0] * self.ranks, []
        for r in window.reads:
            k = min(range(self.ranks), key=lambda i: (rows[i], i))
            owner.append(k)
            rows[k] += r.rows
        return owner

    def _own(self, window: Window) -> tuple[Window, list[int]]:
        """This rank's part of a window (its reads, in window order) and their indices in window.reads."""
        if self.ranks == 1:
            return window, list(range(len(window.reads)))
        mine = [i for i, k in enumerate(self.deal(window)) if k == self.rank]
        return window._replace(reads=[window.reads[i] for i in mine]), mine

    def _order(self, epoch: int, window: Window, step_R: np.ndarray) -> np.ndarray:
        """The permutation of a window's rows (identity when not shuffling)."""
        R = window.rows
        if not self.shuffle:
            return np.arange(R)
        rng = np.random.default_rng([self.seed, 2, epoch, window.index])
        perm = rng.permutation(R)
        if not self.stratify_steps:
            return perm
        s_R = step_R[perm]
        grouped = np.argsort(s_R, kind="stable")  # rows grouped by step, random within a step
        counts = np.bincount(s_R)
        rank = np.empty(R, dtype=np.float64)
        rank[grouped] = np.arange(R) - (np.cumsum(counts) - counts)[s_R[grouped]]
        key = (rank + rng.random(R)) / counts[s_R]
        return perm[np.argsort(key, kind="stable")]

    def _rows_of(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(sample_R, step_R) of a window's rows in read order: known before anything is read."""
        index = [row_index(r.selection) for r in window.reads]
        return np.concatenate([s for s, _ in index]), np.concatenate([t for _, t in index])

    def _fetch_ahead(self, window: Window) -> list[Fetches]:
        """Start fetching a window's chunks from a remote store, all at once (store.remote.fetch_ahead): per
        array, a future of each read's bytes, or None where the read goes to a local file as it happens. A rank
        fetches its own reads only."""
        reads = self._own(window)[0].reads
        if self._source is not None:
            return [Fetches([None] * len(reads)) for _ in self._zarr]
        return [fetch_ahead(z, [r.selection for r in reads]) for z in self._zarr]

    def _read_window(
        self,
        window: Window,
        x_ARD: np.ndarray,
        rows: Sequence[slice | np.ndarray],
        pool: ThreadPoolExecutor,
        ahead: list[Fetches],
    ) -> list[Future]:
        """Start decoding read i of a window, for every array, into x_ARD[a, rows[i]]: a future per job.

        rows[i] is a slice (rows land in read order) or an index array (rows land where the shuffle puts
        them: decoded into a per-thread scratch chunk, then scattered, so the permutation costs no pass of
        its own and runs on every read thread).
        """
        scratch = threading.local()

        def read(a: int, i: int) -> None:
            r, dest = window.reads[i], rows[i]
            shape = (*r.shape, self.layout.d_model)
            if isinstance(dest, slice):
                self._read_chunk(a, r, x_ARD[a, dest].reshape(shape), ahead[a][i])
                return
            if getattr(scratch, "buf", None) is None:
                scratch.buf = np.empty(self._max_chunk_rows * self.layout.d_model, x_ARD.dtype)
            out = scratch.buf[: r.rows * self.layout.d_model].reshape(shape)
            with self._chunk_values(a, r, out, ahead[a][i]) as values:
                x_ARD[a][dest] = values.reshape(r.rows, -1)

        return [pool.submit(read, a, i) for i in range(len(window.reads)) for a in range(len(self.arrays))]

    def _window_array(self, rows: int, dtype: np.dtype) -> np.ndarray:
        """An (A, rows, D) array for a window's shuffled rows: a recycled one that no batch refers to any more,
        else a new one. Reuse matters: a new array of a few hundred MB page-faults on every first write,
        which measured as much as the decoding itself. A batch a caller keeps keeps its array out of reuse."""
        for base in self._recycled:
            if sys.getrefcount(base) == 3:  # held only by this list, the loop variable and the call
                return base[:, :rows]
        base = np.empty((len(self.arrays), self._max_window_rows, self.layout.d_model), dtype)
        # The windows in use at once: the consumer's two (a batch may straddle them), `prefetch` waiting for
        # it, the one the producer waits for and the one queued behind it.
        if len(self._recycled) < 4 + self.prefetch:
            self._recycled.append(base)
        return base[:, :rows]

    @property
    def _max_window_rows(self) -> int:
        """A window exceeds window_rows by less than one unit."""
        return self.window_rows + max(sum(r.rows for r in u) for u in self._units())

    def _read_chunk(self, a: int, r: ChunkRead, out: np.ndarray, fetched=None) -> None:
        if self._source is None:
            read_into(self._zarr[a], r.selection, out, fetched=fetched)
        else:
            np.copyto(out, self._source[a][r.selection])

    @contextmanager
    def _chunk_values(self, a: int, r: ChunkRead, scratch: np.ndarray, fetched=None) -> Iterator[np.ndarray]:
        """A chunk's values: an uncompressed chunk's own bytes (mapped, checked) or `scratch` decoded; from a
        `source`, `scratch` copied from it (the loader's cost when the store costs nothing)."""
        if self._source is None:
            with chunk_values(self._zarr[a], r.selection, scratch, fetched=fetched) as values:
                yield values
        else:
            self._read_chunk(a, r, scratch)
            yield scratch

    def _plan_rows(self, epoch: int, w: Window) -> _Planned:
        """Window w's rows: its permutation and this rank's part (a serial pass over the window's rows, made
        while the read threads read the window before)."""
        sample_R, step_R = self._rows_of(w)
        order_R = self._order(epoch, w, step_R)  # stream position -> row (in read order)
        mine, positions_R = w, None
        if self.ranks > 1:
            mine, order_R, positions_R, own_R = self._share(w, order_R)
            sample_R, step_R = sample_R[own_R], step_R[own_R]
        offsets = np.cumsum([0] + [r.rows for r in mine.reads])
        if self.device.type == "cuda":  # read in order into the pinned slot; the device applies order_R
            rows = [slice(offsets[j], offsets[j + 1]) for j in range(len(mine.reads))]
            return _Planned(epoch, w, mine, rows, step_R, sample_R, order_R, positions_R)
        # On CPU every row is decoded straight to its shuffled place in an array of the window's own, so
        # batches are plain slices of it (no copy, no torch op in the consumer) that stay valid as long as
        # they are held.
        dest_R = np.empty_like(order_R)
        dest_R[order_R] = np.arange(len(order_R))
        rows = [dest_R[offsets[j] : offsets[j + 1]] for j in range(len(mine.reads))]
        return _Planned(epoch, w, mine, rows, step_R[order_R], sample_R[order_R], None, positions_R)

    def _start(
        self, plan: _Planned, slot: _Slot, i: int, free: queue.Queue, pool: ThreadPoolExecutor, ahead
    ) -> _Pending:
        """Hand a planned window's chunks to the read threads; it is read once every job is done."""
        R = len(plan.step_R)
        storage = numpy_storage_dtype(self.store.meta.dtype)
        if self.device.type == "cuda":  # into the pinned slot, in read order
            jobs = self._read_window(plan.mine, slot.x_ARD.numpy().view(storage), plan.rows, pool, ahead)
            slot.step_R[:R] = torch.from_numpy(plan.step_R)
            slot.sample_R[:R] = torch.from_numpy(plan.sample_R)
            slot.order_R[:R] = torch.from_numpy(plan.order_R)
            x_ARD, step_R, sample_R, order_R = (
                slot.x_ARD[:, :R],
                slot.step_R[:R],
                slot.sample_R[:R],
                slot.order_R[:R],
            )
        else:
            free.put(i)  # on CPU the window has an array of its own, not the slot
            x = self._window_array(R, storage)
            jobs = self._read_window(plan.mine, x, plan.rows, pool, ahead)
            x_ARD, order_R = torch.from_numpy(x).view(self._dtype), None
            step_R, sample_R = torch.from_numpy(plan.step_R), torch.from_numpy(plan.sample_R)
        loaded = _Loaded(plan.epoch, plan.window, x_ARD, step_R, sample_R, order_R, i, plan.positions_R)
        return _Pending(jobs, loaded)

    def _share(self, w: Window, order_R: np.ndarray) -> tuple[Window, np.ndarray, np.ndarray, np.ndarray]:
        """This rank's part of window w: (its reads, its rows' order (local stream index -> its row, in its
        read order), their stream positions (ascending), its rows' indices among the window's)."""
        mine, own = self._own(w)
        offsets = np.cumsum([0] + [r.rows for r in w.reads])
        own_R = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in own] or [np.zeros(0, int)])
        position_R = np.empty_like(order_R)
        position_R[order_R] = np.arange(w.rows)
        position_R = position_R[own_R]  # where each of its rows lands in the window's stream
        local_R = np.argsort(position_R, kind="stable")
        return mine, local_R, position_R[local_R], own_R

    def _producer(
        self,
        start: Position,
        epochs: int | None,
        slots: list[_Slot],
        free: queue.Queue,
        out: queue.Queue,
        stop: threading.Event,
    ) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        ahead: list[Fetches] = []
        fetching: list[Fetches] = []
        reading: list[Fetches] = []
        planned: _Planned | None = None
        in_flight: _Pending | None = None
        pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="tide-read")
        try:
            for (epoch, w), following in _pairs(self._stream(start, epochs)):
                # The next window's chunks are requested before this one is decoded, so that a remote
                # store's round trips overlap the decoding.
                reading = ahead
                ahead = fetching or self._fetch_ahead(w)
                fetching = self._fetch_ahead(following[1]) if following else []
                while True:
                    if stop.is_set():
                        return
                    try:
                        i = free.get(timeout=0.1)
                        break
                    except queue.Empty:
                        pass
                if slots[i].ready is not None:
                    slots[i].ready.synchronize()
                pending = self._start(planned or self._plan_rows(epoch, w), slots[i], i, free, pool, ahead)
                # The next window is planned while the read threads read this one, so they never wait for it.
                planned = self._plan_rows(*following) if following else None
                # This window's chunks queue behind the previous one's before that one is waited for, so
                # the read threads go from one window to the next without waiting for the consumer.
                if in_flight is not None and not put(in_flight.result()):
                    return
                in_flight = pending
            if in_flight is not None and not put(in_flight.result()):
                return
            put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)
        finally:
            for f in reading + ahead + fetching:  # a stopped or failed loader leaves no requests running
                f.cancel()
            pool.shutdown(cancel_futures=True)  # chunks of a window no one will take are not read

    def _stream(self, start: Position, epochs: int | None) -> Iterator[tuple[int, Window]]:
        """(epoch, window) in stream order from `start`, for `epochs` epochs or forever."""
        epoch = start.epoch
        while epochs is None or epoch < start.epoch + epochs:
            for w in self.plan(epoch):
                if not (epoch == start.epoch and w.start + w.rows <= start.rows):
                    yield epoch, w
            epoch += 1

    def batches(self, start: Position = Position(0, 0), epochs: int | None = None) -> Iterator[Batch]:
        """Batches from `start` on, for `epochs` epochs (counting start's) or forever; close() it to stop early."""
        if start.rows >= self.rows_per_epoch:
            start = Position(start.epoch + 1, 0)
        max_rows = self._max_window_rows
        cuda = self.device.type == "cuda"
        # Two windows in use (a batch may straddle them) plus the ones read ahead.
        slots = [
            _Slot(len(self.arrays), max_rows if cuda else 0, self.layout.d_model, self._dtype, cuda)
            for _ in range(2 + self.prefetch)
        ]
        free: queue.Queue[int] = queue.Queue()
        for i in range(len(slots)):
            free.put(i)
        loaded: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._producer,
            args=(start, epochs, slots, free, loaded, stop),
            name="tide-loader",
            daemon=True,
        )
        thread.start()
        try:
            yield from self._assemble(start, slots, free, loaded)
        finally:
            stop.set()
            thread.join()

    def _assemble(
        self, start: Position, slots: list[_Slot], free: queue.Queue, loaded: queue.Queue
    ) -> Iterator[Batch]:
        B = self.batch_size
        parts: list[tuple[Tensor, Tensor, Tensor]] = []  # rows of a batch not yet complete
        have, first = 0, True
        while (item := loaded.get()) is not None:
            if isinstance(item, StoreError):  # a damaged chunk: its message names the file and the fix
                raise item
            if isinstance(item, BaseException):
                raise RuntimeError(f"reading {self.store.path} failed: {item}") from item
            w = item.window
            take = self._taker(item, slots, free)
            pos = start.rows - w.start if first and item.epoch == start.epoch else 0
            first = False
            while pos < w.rows:
                n = min(B - have, w.rows - pos)
                parts.append(take(*_span(item.positions_R, pos, pos + n)))
                pos, have = pos + n, have + n
                if have == B:
                    yield self._batch(parts, Position(item.epoch, w.start + pos), have)
                    parts, have = [], 0
            if w.start + w.rows == self.rows_per_epoch:  # the epoch's last window
                if parts and not self.drop_last:
                    yield self._batch(parts, Position(item.epoch, self.rows_per_epoch), have)
                parts, have = [], 0

    def _taker(
        self, item: _Loaded, slots: list[_Slot], free: queue.Queue
    ) -> Callable[[int, int], tuple[Tensor, Tensor, Tensor]]:
        """rows(lo, hi): (x_ABD, step_B, sample_B) of stream rows [lo, hi) of a loaded window."""
        if item.order_R is None:
            return lambda lo, hi: (item.x_ARD[:, lo:hi], item.step_R[lo:hi], item.sample_R[lo:hi])
        dev, slot = self.device, slots[item.slot]
        x_ARD, step_R, sample_R, order_R = (v.to(dev, non_blocking=True) for v in item[2:6])
        slot.ready = torch.cuda.Event()
        slot.ready.record()
        free.put(item.slot)  # the producer waits on slot.ready before refilling it

        def take(lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
            idx = order_R[lo:hi]
            return x_ARD.index_select(1, idx), step_R[idx], sample_R[idx]

        return take

    def _batch(self, parts: list[tuple[Tensor, Tensor, Tensor]], position: Position, rows: int) -> Batch:
        if len(parts) == 1:
            x_ABD, step_B, sample_B = parts[0]
        else:
            x_ABD = torch.cat([p[0] for p in parts], dim=1)
            step_B, sample_B = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        total = rows if self.ranks > 1 else None
        return Batch(x_ABD.view(self._view), self.timesteps_S[step_B], step_B, sample_B, position, total)
