"""Harvest on a dask.distributed cluster: one task per sample chunk, many workers filling one store.

The client plans the store and creates it once (harvest/run.py's `opened`: the same inspection, lock and
refusals as a local harvest), then submits one task per unfinished sample chunk. A task runs
`harvest_chunk` (harvest/chunk.py, the function the local loop calls) on its worker, which loads the model
once and keeps it, and writes whole chunks of every array straight into the store, its stats sums and
then its `done` flags; only a ChunkSummary travels back. The store is a folder every worker sees at the
same path (a shared filesystem), or an s3:// or gs:// URL that every worker opens itself through
store/open.py, with the credentials of its own environment or the client's --storage-options, which travel
with the job and are never written into the store. A worker that dies mid-task (SIGKILL, lost node) has its
task rerun elsewhere by dask; the rerun overwrites the same whole chunks, so the store is byte for byte what
one process makes (on the CPU every process runs the model on the store's cpu_threads).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from tide.harvest.chunk import ChunkSummary, harvest_chunk
from tide.harvest.config import HarvestConfig
from tide.harvest.model import LoadedModel
from tide.harvest.run import HarvestResult, chunk_samples, load_for_harvest, opened
from tide.harvest.target import HarvestError, writable_out, write_failure
from tide.store.failures import os_error
from tide.store.fingerprint import check_same_model
from tide.store.open import (
    LocationError,
    canonical,
    current_storage_options,
    explain,
    first_line,
    read_json,
    storage_options,
    where,
    zarr_store,
)
from tide.store.schema import StoreMeta

START_SCHEDULER = (
    "start one with `dask scheduler` (it prints its address, tcp://HOST:8786) and give it workers with "
    "`dask worker tcp://HOST:8786 --nthreads 1` on machines that can reach --out"
)


class ClusterJob(NamedTuple):
    """What every chunk task of one harvest needs; sent to each worker once."""

    model: str
    """The model folder (absolute) or hub id, as the workers load it."""
    revision: str | None
    """Hub revision."""
    device: str
    """cfg.device, resolved on the worker ('auto': its GPU when it has one)."""
    model_dtype: str
    """Dtype the transformer runs in."""
    out: str
    """The store: an absolute folder that every worker must see, or an s3:// or gs:// URL."""
    meta: StoreMeta
    """The store's metadata."""
    arrays: dict[str, Any]
    """The plan's per-sample arrays, on the CPU."""
    save_images: bool
    """Also write the final images."""
    writer_queue: int
    """Pending writes a worker's writer thread holds."""
    storage_options: dict[str, Any]
    """The client's --storage-options, which the workers open the store with (they may hold credentials: they
    travel with the job, never into the store)."""


class ChunkFailed(HarvestError):
    """A chunk task failed for a real reason; the message names the chunk, the worker and what to do."""


# --- the client --------------------------------------------------------------------------------------


@contextmanager
def connect(
    scheduler: str | None = None, workers: int | None = None, timeout: float = 10, wait: float = 60
) -> Iterator[Any]:
    """A dask Client of the cluster at `scheduler`, or of a local cluster of `workers` processes started
    (and closed) here. Fails within `timeout` seconds when the scheduler cannot be reached, and after
    `wait` seconds when it has no worker."""
    from distributed import Client

    if (scheduler is None) == (workers is None):
        raise HarvestError("pass either --scheduler tcp://HOST:PORT or --workers N, not both")
    if workers is not None and workers < 1:
        raise HarvestError(f"--workers {workers}: give 1 or more worker processes")
    cluster = local_cluster(workers) if workers is not None else None
    try:
        try:
            client = Client(cluster if cluster is not None else scheduler, timeout=timeout)
        except (OSError, TimeoutError) as e:
            raise HarvestError(
                f"cannot reach the dask scheduler at {scheduler} within {timeout:g} s ({e}); is it running "
                f"and is the address right? {START_SCHEDULER}"
            ) from None
        try:
            try:
                client.wait_for_workers(1, timeout=wait)
            except TimeoutError:
                raise HarvestError(
                    f"the dask scheduler at {client.scheduler.address} has no worker after {wait:g} s; start "
                    f"some with `dask worker {client.scheduler.address} --nthreads 1`"
                ) from None
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


# dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 to hand memory back to the OS. Setting it
# also pins glibc's mmap threshold, so every activation tensor of a denoising step became a fresh mmap with
# its page faults: the demo harvest ran 1.6x slower in a worker than in a plain process (25.0 s against
# 15.4 s, one thread each). Workers started here keep glibc's reuse of large blocks instead.
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


def local_cluster(n: int) -> Any:
    """N worker processes on this machine: one per GPU, each pinned to its own device by
    CUDA_VISIBLE_DEVICES (dask-cuda's LocalCUDACluster when installed), or N single-threaded processes."""
    import dask

    key = "distributed.nanny.pre-spawn-environ"  # read when the nannies are made, below
    # A nanny takes a variable of this process's environment over its config, and writes its own into that
    # environment when it starts a worker: after any earlier local cluster, dask's 65536 would win here.
    saved = {k: os.environ.pop(k, None) for k in WORKER_MALLOC}
    try:
        with dask.config.set({key: {**dask.config.get(key, {}), **WORKER_MALLOC}}):
            return _local_cluster(n)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _local_cluster(n: int) -> Any:
    import logging

    import torch
    from distributed import LocalCluster

    if not torch.cuda.is_available():
        # silence_logs: a failed task reaches the user once, as the client's one-paragraph error.
        return LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return _pinned_cluster(n, torch.cuda.device_count())
    return LocalCUDACluster(n_workers=n, threads_per_worker=1, dashboard_address=None)


def _pinned_cluster(n: int, gpus: int) -> Any:
    """What dask-cuda does, without it: worker i sees GPU i first (CUDA_VISIBLE_DEVICES rotated)."""
    from distributed import Nanny, Scheduler, SpecCluster

    def visible(i: int) -> str:
        return ",".join(str((i + k) % gpus) for k in range(gpus))

    specs = {
        i: {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": visible(i)}}}
        for i in range(n)
    }
    return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})


def harvest_where(
    cfg: HarvestConfig, scheduler: str | None, workers: int | None, log: Callable[[str], None] = print
) -> HarvestResult:
    """`tide harvest`: in this process, or on the dask cluster at `scheduler`, or on a local one of `workers`
    processes; the store is the same either way."""
    from tide.harvest.run import harvest

    if scheduler is None and workers is None:
        return harvest(cfg, log=log)
    with connect(scheduler, workers) as client:
        log(f"dask cluster at {client.scheduler.address}: {len(client.nthreads())} workers")
        return harvest_on_cluster(cfg, client, log=log)


def harvest_on_cluster(cfg: HarvestConfig, client: Any, log: Callable[[str], None] = print) -> HarvestResult:
    """Run the harvest of `cfg` as one dask task per unfinished sample chunk on `client`'s cluster.

    The store equals a local `harvest(cfg)`'s, byte for byte, whatever the workers and the order tasks
    finish in; re-running resumes. The client plans on its CPU (the model is loaded there once to read its
    shapes and scheduler) and holds the harvest lock while the workers write.
    """
    writable_out(cfg.out)  # a read-only URL or an unknown scheme, before loading the model
    model = load_for_harvest(cfg, device="cpu")
    with opened(cfg, model, log) as store:
        del model  # the workers load their own
        if not store.todo:
            return HarvestResult(cfg.out, 0, store.meta.num_samples)
        job = _job(cfg, store.meta, store.arrays)
        _check_workers_see(client, job.out, job.storage_options)
        _run_tasks(client, job, store.todo, cfg.progress)
    return HarvestResult(cfg.out, chunk_samples(store.meta, store.todo), store.meta.num_samples)


def _job(cfg: HarvestConfig, meta: StoreMeta, arrays: dict[str, Any]) -> ClusterJob:
    model = Path(cfg.model)
    # A relative model folder or --out means the client's working directory, not the workers'.
    model_ref = str(model.resolve()) if model.exists() else cfg.model
    cpu = {k: v for k, v in arrays.items() if k != "prompt_embeds"}
    if arrays.get("prompt_embeds") is not None:
        cpu["prompt_embeds"] = {k: v.cpu() for k, v in arrays["prompt_embeds"].items()}
    return ClusterJob(
        model_ref,
        cfg.revision,
        cfg.device,
        cfg.model_dtype,
        canonical(cfg.out),
        meta,
        cpu,
        cfg.save_images,
        cfg.writer_queue,
        current_storage_options(),
    )


def _check_workers_see(client: Any, out: str, options: dict[str, Any] | None = None) -> None:
    seen = client.run(_sees_store, out, options or {})
    blind = [
        f"{addr} (host {host}{': ' + why if why else ''})" for addr, (ok, host, why) in seen.items() if not ok
    ]
    if not blind:
        return
    if where(out).local:
        raise HarvestError(
            f"dask worker(s) {', '.join(blind)} cannot see the store {out}; the workers write into it "
            "directly, so they must share the client's filesystem at the same path (run them on machines "
            "that mount it, choose an --out on a shared filesystem, or an s3:// or gs:// URL); nothing but "
            "the empty store was written"
        )
    raise HarvestError(
        f"dask worker(s) {', '.join(blind)} cannot open the store {out}; the workers write into it directly: "
        "give them credentials and the endpoint in their environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...) or pass them with --storage-options; nothing but "
        "the empty store was written"
    )


def _run_tasks(client: Any, job: ClusterJob, todo: list[int], progress: bool) -> None:
    """Submit a task per chunk of `todo`, feed the bar as they finish, stop at the first failure."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    # The job rides in the task graph rather than being scattered: the scheduler keeps it, so a worker
    # that dies holding the only copy (--workers 1) costs a recompute of this task, not the run.
    job_f = client.submit(_the_job, job, pure=False)
    futures = [client.submit(_chunk_task, job_f, c, pure=False) for c in todo]
    total = chunk_samples(job.meta, todo) * job.meta.num_inference_steps
    bar = tqdm(total=total, unit="img-step", disable=not progress, smoothing=0.1)
    try:
        for f in as_completed(futures):
            if f.status != "finished":
                raise _failure(f, job) from None  # the worker's message says it all; no remote traceback
            summary: ChunkSummary = f.result()
            bar.update(summary.img_steps)
            bar.set_postfix(workers=len(client.nthreads()), refresh=False)
    finally:
        bar.close()
        client.cancel(futures)


def _failure(future: Any, job: ClusterJob) -> HarvestError:
    """A one-paragraph HarvestError for a failed chunk future, without the remote traceback."""
    from distributed.scheduler import KilledWorker

    e = future.exception() if future.status == "error" else None
    if e is None:  # cancelled or lost, e.g. its input went with a worker the scheduler cannot replace
        return HarvestError(
            f"a chunk task of the harvest of {job.out} ended {future.status} (the cluster lost it); run the "
            "same command again: it resumes"
        )
    if isinstance(e, HarvestError):
        return HarvestError(str(e))
    if isinstance(e, KilledWorker):
        return HarvestError(
            f"a chunk task of the harvest of {job.out} killed every worker that ran it ({e}); a worker "
            "process dies like this when it runs out of memory: lower --batch-size or give workers more "
            "memory, then run the same command again (it resumes)"
        )
    return HarvestError(f"a chunk task of the harvest of {job.out} failed: {type(e).__name__}: {e}")


# --- the workers -------------------------------------------------------------------------------------


def _the_job(job: ClusterJob) -> ClusterJob:
    return job


def _sees_store(out: str, options: dict[str, Any]) -> tuple[bool, str, str]:
    """Whether this worker finds the store at `out` through store/open.py, its host, and why not."""
    loc = where(out)
    try:
        with storage_options(options):
            found = read_json(zarr_store(loc, "r"), loc) is not None
    except LocationError as e:
        return False, socket.gethostname(), str(e)
    return found, socket.gethostname(), "" if found else "no store there"


_LOADED: dict[tuple, LoadedModel] = {}
"""The model each worker process loaded, kept for its later tasks."""


def _worker_model(job: ClusterJob) -> LoadedModel:
    key = (job.model, job.revision, job.device, job.model_dtype)
    if key not in _LOADED:
        _LOADED.clear()  # one model at a time: a worker reused by another harvest frees the last one
        cfg = HarvestConfig(model=job.model, revision=job.revision, model_dtype=job.model_dtype)
        _LOADED[key] = load_for_harvest(cfg, device=job.device)
    model = _LOADED[key]
    check_same_model(
        job.meta.model, model.info.fingerprint, job.model, "the model this worker loaded is not the client's",
        "give every machine the same model folder", HarvestError,
    )  # fmt: skip
    return model


def _chunk_task(job: ClusterJob, c: int) -> ChunkSummary:
    """The dask task: write sample chunk `c`; any failure becomes one ChunkFailed paragraph naming the
    chunk and this worker."""
    try:
        return _write_chunk(job, c)
    except Exception as e:
        raise ChunkFailed(f"sample chunk {c} failed on dask worker {_where()}: {_reason(e, job)}") from None


def _write_chunk(job: ClusterJob, c: int) -> ChunkSummary:
    import zarr
    from tide.store.writer import StoreWriter

    found, _, why = _sees_store(job.out, job.storage_options)
    if not found:
        shared = "a shared filesystem at the same path" if where(job.out).local else "credentials for it"
        raise HarvestError(f"this worker cannot open the store {job.out} ({why}); workers need {shared}")
    model = _worker_model(job)
    arrays = dict(job.arrays)
    if "prompt_embeds" in arrays:
        arrays["prompt_embeds"] = {
            k: v.to(model.transformer.device) for k, v in arrays["prompt_embeds"].items()
        }
    with storage_options(job.storage_options):  # the store object keeps them: the writer thread needs none
        root = zarr.open_group(zarr_store(where(job.out), "w"), mode="r+", zarr_format=3)
    writer = StoreWriter(root, job.meta, max_pending=job.writer_queue)
    try:
        summary = harvest_chunk(c, model, job.meta, arrays, writer, job.save_images)
    finally:
        writer.close()
    return summary


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception behind `e` (the writer thread re-raises its errors wrapped)."""
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def _where() -> str:
    try:
        from distributed import get_worker

        address = get_worker().address
    except ValueError:  # not in a worker (a direct call)
        address = "(none)"
    return f"{address} (host {socket.gethostname()}, pid {os.getpid()})"


def _reason(e: BaseException, job: ClusterJob) -> str:
    """What went wrong, in one line that ends with what to do."""
    loc, root = where(job.out), _root_cause(e)
    # An object store's errors (credentials, bucket, connection), said as store/open.py says them.
    told = None if loc.local else explain(loc, root)
    if told is not None:
        return f"{told}; the store is resumable: fix that and run the same command again"
    err = os_error(e)
    if err is not None:
        return str(write_failure(Path(job.out) if loc.local else job.out, err, job.meta.num_samples))
    if isinstance(e, HarvestError | LocationError):
        return str(e)
    if type(e).__name__ == "OutOfMemoryError":
        return f"{e} Lower --batch-size, or use workers with more GPU memory; re-running resumes."
    if isinstance(e, RuntimeError) and root is not e:  # the writer thread's error, wrapped
        return f"writing the store failed ({first_line(root)}); it is resumable: run the same command again"
    return f"{type(e).__name__}: {e}"
