"""harvest(cfg): run the DiT over its denoising steps and write the chosen activations into a tide store.

The steps, each in its own module: plan (harvest/plan.py) -> inspect, lock and open --out
(harvest/target.py) -> one sample chunk at a time (harvest/chunk.py). harvest/cluster.py runs the same
chunks as dask tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import zarr
from tide.harvest.chunk import harvest_chunk
from tide.harvest.config import HarvestConfig
from tide.harvest.model import LoadedModel, load_model
from tide.harvest.plan import TORCH_DTYPES, image_shape, plan
from tide.harvest.target import (
    HarvestError,
    Target,
    inspect_out,
    locked,
    open_target,
    writable_out,
    write_failure,
)
from tide.store.card import write_card
from tide.store.device import resolve_device
from tide.store.failures import os_error
from tide.store.open import remote_error, where
from tide.store.schema import StoreMeta
from tide.store.writer import StoreWriter, block_bytes, disk_bound, free_bytes
from tqdm.auto import tqdm

__all__ = ["HarvestError", "HarvestResult", "Opened", "harvest", "load_for_harvest", "opened", "plan"]


class HarvestResult(NamedTuple):
    out: Path
    """The store."""
    written: int
    """Samples this run wrote; 0 when the store was already complete (nothing was written then)."""
    num_samples: int
    """Samples in the store, all of them done now."""

    def summary(self) -> str:
        """What `tide harvest` prints when it is done."""
        if self.written:
            return f"wrote {self.out}"
        return f"already complete: {self.out} holds all {self.num_samples} samples; nothing was written"


def format_bytes(n: float) -> str:
    """A byte count for people: 512 B, 3.5 KiB, 12.0 MiB, 1.25 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _check_space(cfg: HarvestConfig, target: Target, arrays: dict[str, Any], log) -> None:
    """Refuse, before anything is written, a harvest whose upper bound on disk use exceeds the free space."""
    lay = target.meta.layout()
    todo_samples = sum(lay.sample_chunk(c).stop - lay.sample_chunk(c).start for c in target.todo)
    if not where(cfg.out).local:
        if log is not None:
            log(
                f"{cfg.out}: {lay.num_samples} samples, {lay.num_samples - todo_samples} already done; the free-disk "
                "check is skipped for an object store (its capacity is the provider's)"
            )
        return
    image = arrays.get("image_shape")
    need = disk_bound(
        target.meta,
        len(target.todo),
        create=not target.resume,
        images_shape=None if image is None else (image[1], image[2], image[0]),
        block=block_bytes(cfg.out),
    )
    free = free_bytes(cfg.out)
    if log is not None:
        log(
            f"{cfg.out}: {lay.num_samples} samples x {lay.num_steps} steps x {lay.tokens} tokens x {lay.d_model} d, "
            f"{len(target.meta.act_names())} arrays; {lay.num_samples - todo_samples} samples already done; "
            f"at most {format_bytes(need)} to write ({format_bytes(free)} free)"
        )
    if target.todo and need > free:
        raise HarvestError(
            f"the harvest of {todo_samples} samples needs up to {format_bytes(need)} of disk (uncompressed, "
            f"with metadata and filesystem blocks) but only {format_bytes(free)} is free at {cfg.out}; nothing "
            "was written. Lower --num-samples, --layers, --sites or --token-fraction, free space, or choose an "
            "--out on another disk"
        )


class Opened(NamedTuple):
    """A store open for writing, under the harvest lock."""

    root: zarr.Group
    """The store's root group."""
    meta: StoreMeta
    """Its metadata (the existing store's when resuming)."""
    arrays: dict[str, Any]
    """The plan's per-sample arrays (seeds, labels, prompt embeddings, image shape)."""
    todo: list[int]
    """Sample chunks still to write; empty when the store is complete (it was not opened then)."""


def load_for_harvest(cfg: HarvestConfig, device: str | None = None) -> LoadedModel:
    """The model of `cfg`, on `device` (default cfg.device resolved), in cfg.model_dtype."""
    dev = resolve_device(device or cfg.device)
    return load_model(
        cfg.model,
        cfg.revision,
        device=dev,
        dtype=TORCH_DTYPES[cfg.model_dtype],
        height=cfg.height,
        width=cfg.width,
    )


@contextmanager
def opened(cfg: HarvestConfig, model: LoadedModel, log: Callable[[str], None]) -> Iterator[Opened]:
    """Plan the harvest, refuse what must be refused before writing, then hold the lock of cfg.out and
    yield the store created, resumed or replaced. An OSError meets the user as a HarvestError."""
    meta, arrays = plan(cfg, model)
    if cfg.save_images:
        arrays["image_shape"] = image_shape(model)
    _check_space(cfg, inspect_out(cfg, meta), arrays, None)
    try:
        if where(cfg.out).local:
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
        with locked(cfg.out):
            # Again under the lock: another harvest may have changed --out since the check above.
            target = inspect_out(cfg, meta)
            _check_space(cfg, target, arrays, log)
            if target.resume and target.meta.codec != cfg.codec and log is not None:
                log(
                    f"{cfg.out}: resumed in the store's own codec {target.meta.codec} (--codec {cfg.codec} is for a "
                    f"new store; `tide store pack --codec {cfg.codec}` recompresses a finished one)"
                )
            if not target.todo:  # the caller says so, from the result (written == 0): said once
                yield Opened(None, target.meta, arrays, [])
                return
            root, meta = open_target(cfg, target, arrays, log)
            yield Opened(root, meta, arrays, target.todo)
            write_card(cfg.out)  # the dataset card (README.md) describes the finished store
    except OSError as e:  # making the folder, the lock or the store; the chunk writers report their own
        raise write_failure(cfg.out, e, meta.num_samples, creating=True) from e


def harvest(cfg: HarvestConfig, log: Callable[[str], None] = print) -> HarvestResult:
    """Run the harvest described by `cfg`, resuming a store left by an interrupted run.

    Every refusal (another configuration, a folder that is not a tide store, too little disk) comes before
    anything is written. A full disk or an unwritable folder met later ends in a HarvestError that says
    what to do; the store stays resumable.
    """
    writable_out(cfg.out)  # a read-only URL or an unknown scheme, before loading the model
    model = load_for_harvest(cfg)
    with opened(cfg, model, log) as job:
        written = _write(cfg, model, job) if job.todo else 0
    return HarvestResult(cfg.out, written, job.meta.num_samples)


def chunk_samples(meta: StoreMeta, chunks: list[int]) -> int:
    """Samples in the sample chunks `chunks`."""
    lay = meta.layout()
    return sum(lay.sample_chunk(c).stop - lay.sample_chunk(c).start for c in chunks)


def _write(cfg: HarvestConfig, model: LoadedModel, job: Opened) -> int:
    """Generate and write sample chunks job.todo (returns their sample count); a write error becomes a
    HarvestError naming what was kept."""
    todo_samples = chunk_samples(job.meta, job.todo)
    writer = StoreWriter(job.root, job.meta, max_pending=cfg.writer_queue)
    try:
        try:
            bar = tqdm(
                total=todo_samples * cfg.num_steps, unit="img-step", disable=not cfg.progress, smoothing=0.1
            )
            for c in job.todo:
                harvest_chunk(c, model, job.meta, job.arrays, writer, cfg.save_images, bar.update)
            bar.close()
        finally:
            writer.close()
    except Exception as e:
        kept = job.meta.num_samples - todo_samples + writer.samples_done
        failure = chunk_failure(cfg.out, job.meta, e, kept)
        if failure is None:
            raise
        raise failure from e
    return todo_samples


def chunk_failure(out: Path | str, meta: StoreMeta, e: BaseException, done: int) -> HarvestError | None:
    """The HarvestError for an error `e` met while filling the store, with `done` samples complete in it: a
    remote store that stopped answering, or a local write error; None when `e` is neither."""
    loc = where(out)
    lost = None if loc.local else remote_error(e, loc)
    if lost is not None:
        return HarvestError(
            f"{lost}. {done} of {meta.num_samples} samples had been written completely and are kept; the store "
            "is resumable: when the store answers again, run the same command, which writes the rest"
        )
    err = os_error(e)
    return None if err is None else write_failure(out, err, meta.num_samples, done)
