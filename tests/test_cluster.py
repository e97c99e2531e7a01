"""Harvest on a dask.distributed cluster into a folder (issue 9): the store equals a single-process run's byte
for byte, also when a worker is SIGKILLed mid-task; failures read as one paragraph. tests/test_cluster_s3.py
does the same into object storage, on a cluster started by hand.

The reference is `harvest(cfg)` in this process; stores are compared file by file (every chunk's bytes,
the stats, every zarr.json), the root metadata's creation time excepted. Faults are injected by worker
plugins registered from the test, never by production flags.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from tide.harvest.cluster import ClusterJob, _check_workers_see, _chunk_task, connect, harvest_on_cluster
from tide.harvest.config import HarvestConfig
from tide.harvest.run import HarvestError, harvest
from tide.harvest.target import HarvestError as TargetError

from tests.cluster_helpers import KillFirstWriter, assert_same_store, cli, free_port

# The plugins below are defined here; workers (other processes, maybe started by hand) unpickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SETTINGS = dict(
    num_samples=6, num_steps=6, batch_size=2, sites=("resid", "mlp"), device="cpu", progress=False
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    harvest(HarvestConfig(out=out, **SETTINGS), log=lambda m: None)
    return out


class DiskFull(WorkerPlugin):
    """Every activation block write fails as on a full disk."""

    name = "disk-full"

    def setup(self, worker):
        from tide.store.writer import StoreWriter

        self.real = StoreWriter.write_block

        def write_block(writer, *args):
            raise OSError(errno.ENOSPC, "No space left on device", "/some/chunk")

        StoreWriter.write_block = write_block

    def teardown(self, worker):
        from tide.store.writer import StoreWriter

        StoreWriter.write_block = self.real


def test_two_workers_equal_one_process(dask_client, reference, tmp_path):
    out = tmp_path / "cluster.zarr"
    result = harvest_on_cluster(HarvestConfig(out=out, **SETTINGS), dask_client, log=lambda m: None)
    assert result.written == 6
    assert_same_store(out, reference)
    again = harvest_on_cluster(HarvestConfig(out=out, **SETTINGS), dask_client, log=lambda m: None)
    assert again.written == 0  # complete: a re-run resumes, and here has nothing left


def test_worker_killed_mid_task_still_equal(dask_client, reference, tmp_path):
    flag = tmp_path / "killed"
    dask_client.register_plugin(KillFirstWriter(str(flag)))
    try:
        out = tmp_path / "cluster.zarr"
        harvest_on_cluster(HarvestConfig(out=out, **SETTINGS), dask_client, log=lambda m: None)
    finally:
        dask_client.unregister_worker_plugin(KillFirstWriter.name)
    assert flag.exists(), "no worker was killed"
    assert_same_store(out, reference)


def test_the_only_worker_killed_mid_task_still_equal(reference, tmp_path):
    """With one worker nothing else holds the job: it must come back from the scheduler after the restart."""
    flag = tmp_path / "killed"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as one:
            one.register_plugin(KillFirstWriter(str(flag)))
            out = tmp_path / "cluster.zarr"
            harvest_on_cluster(HarvestConfig(out=out, **SETTINGS), one, log=lambda m: None)
    assert flag.exists(), "no worker was killed"
    assert_same_store(out, reference)


def test_failing_task_stops_the_run_in_one_paragraph(dask_client, tmp_path):
    dask_client.register_plugin(DiskFull())
    try:
        with pytest.raises(HarvestError) as e:
            harvest_on_cluster(
                HarvestConfig(out=tmp_path / "full.zarr", **SETTINGS), dask_client, log=lambda m: None
            )
    finally:
        dask_client.unregister_worker_plugin(DiskFull.name)
    msg = str(e.value)
    assert "failed on dask worker tcp://" in msg and "is full" in msg and "run the same command again" in msg
    assert "Traceback" not in msg and "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_bad_model_folder_on_a_worker(dask_client, reference, tmp_path):
    from tide.store.reader import open_store

    store = open_store(reference)
    job = ClusterJob(
        str(tmp_path / "no-model"), None, "cpu", "float32", str(reference), store.meta, {}, False, 2, {}
    )
    with pytest.raises(TargetError) as e:
        dask_client.submit(_chunk_task, job, 0, pure=False).result()
    assert "sample chunk 0 failed on dask worker tcp://" in str(e.value)
    assert str(tmp_path / "no-model") in str(e.value)


def test_workers_that_cannot_see_the_store(dask_client, tmp_path):
    elsewhere = tmp_path / "not-shared.zarr"  # no store there: as a worker without the shared mount sees it
    with pytest.raises(HarvestError, match="cannot see the store") as e:
        _check_workers_see(dask_client, str(elsewhere))
    assert str(elsewhere) in str(e.value)
    assert all(addr in str(e.value) for addr in dask_client.nthreads())


def test_unreachable_scheduler_fails_fast():
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(HarvestError) as e:
        with connect(scheduler=address, timeout=2):
            pass
    assert time.monotonic() - start < 10
    assert address in str(e.value) and "dask scheduler" in str(e.value) and "dask worker" in str(e.value)


def test_both_or_neither_of_scheduler_and_workers():
    with pytest.raises(HarvestError, match="either --scheduler"):
        with connect(scheduler="tcp://127.0.0.1:1", workers=2):
            pass


def test_cli_unreachable_scheduler_in_one_paragraph(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    run = subprocess.run(
        cli("--out", str(tmp_path / "x.zarr"), "--scheduler", address),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and time.monotonic() - start < 30
    assert run.stderr.startswith("error: ") and address in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.zarr").exists()


def _worker_env() -> dict[str, str | None]:
    keys = ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
    return {k: os.environ.get(k) for k in keys}


def test_local_workers_keep_large_allocations_and_one_thread():
    """dask's default MALLOC_TRIM_THRESHOLD_=65536 made every step's tensors fresh mmaps (1.6x slower)."""
    from tide.harvest.cluster import WORKER_MALLOC

    with connect(workers=1) as one:
        (env,) = one.run(_worker_env).values()
    assert env == {"OMP_NUM_THREADS": "1", **WORKER_MALLOC}
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) > 65536
