"""Bitwise reproducibility across process layouts (issue 24, point 8): a local harvest on 2 torch threads, a
dask cluster of 1-thread workers and a local run resumed on the cluster write the same bytes.

The settings are chosen to make the cause visible: with 3 samples a chunk the model's batch has 6 rows, and
MKL's sgemm sums a 6-row product differently on 1 and 2 threads (160 of the 73,728 stored float16 values,
by up to 0.004). tide runs every model call on the CPU on the store's `cpu_threads`, whatever the
process's own count, so the layout no longer shows in the bytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tide.harvest.cluster import harvest_on_cluster
from tide.harvest.config import HarvestConfig
from tide.harvest.run import harvest
from tide.store.reader import open_store

from tests.cluster_helpers import assert_same_store, done_flags
from tests.conftest import kill_harvest_mid_run

SETTINGS = dict(num_samples=9, num_steps=4, batch_size=3, layers="3", device="cpu", progress=False)


def _local(out: Path, process_threads: int, **extra) -> Path:
    """A one-process harvest with this process on `process_threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(process_threads)
    try:
        harvest(HarvestConfig(out=out, **{**SETTINGS, **extra}), log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def two_threads(tmp_path_factory) -> Path:
    """The default harvest made by a process on 2 torch threads (what a 2-core machine runs by default)."""
    return _local(tmp_path_factory.mktemp("local") / "two.zarr", 2)


def _worker_threads() -> int:
    return torch.get_num_threads()


def test_cluster_of_one_thread_workers_equals_a_two_thread_process(dask_client, two_threads, tmp_path):
    assert set(dask_client.run(_worker_threads).values()) == {1}
    out = tmp_path / "cluster.zarr"
    harvest_on_cluster(HarvestConfig(out=out, **SETTINGS), dask_client, log=lambda m: None)
    assert_same_store(out, two_threads)


def test_local_run_killed_and_resumed_on_the_cluster_equals_one_run(dask_client, two_threads, tmp_path):
    out = tmp_path / "mixed.zarr"
    args = ["--num-samples", "9", "--num-steps", "4", "--batch-size", "3", "--layers", "3", "--device", "cpu"]
    cmd = [sys.executable, "-c", "from tide.cli import app; app()", "harvest", *args, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    kill_harvest_mid_run([*cmd, "--out", str(out)], env, lambda: done_flags(out))
    result = harvest_on_cluster(HarvestConfig(out=out, **SETTINGS), dask_client, log=lambda m: None)
    assert 0 < result.written < 9
    assert_same_store(out, two_threads)


def test_the_recorded_thread_count_is_what_every_layout_runs(dask_client, two_threads, tmp_path):
    """cpu_threads=2 is recorded; a 1-thread process and 1-thread workers both follow it, and its bytes differ
    from the 1-thread store's: the count is what decides them. One chunk of 3 samples is enough."""
    one_chunk = {"num_samples": 3, "cpu_threads": 2}
    local = _local(tmp_path / "local2.zarr", 1, **one_chunk)
    assert open_store(local).meta.harvest_config["cpu_threads"] == 2
    cluster = tmp_path / "cluster2.zarr"
    harvest_on_cluster(
        HarvestConfig(out=cluster, **{**SETTINGS, **one_chunk}), dask_client, log=lambda m: None
    )
    assert_same_store(cluster, local)
    a, b = open_store(local).root["resid_l03"][:], open_store(two_threads).root["resid_l03"][:3]
    assert (a != b).sum() > 0, "2 threads made the same bytes as 1: these settings no longer show the cause"
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-2)


def test_a_store_from_before_cpu_threads_resumes(two_threads, tmp_path):
    """A store whose harvest config has no cpu_threads (made by an older tide) resumes as if it said 1."""
    import shutil

    from tide.store.writer import everything

    out = tmp_path / "old.zarr"
    shutil.copytree(two_threads, out)
    root = zarr.open_group(str(out), mode="r+")
    attrs = dict(root.attrs)
    del attrs["harvest_config"]["cpu_threads"]
    root.attrs.put(attrs)
    # Version 3 stores keep every chunk, even one equal to the fill value.
    everything(root["done"])[6:] = False
    result = harvest(HarvestConfig(out=out, **SETTINGS), log=lambda m: None)
    assert result.written == 3
    assert "cpu_threads" not in open_store(out).meta.harvest_config
