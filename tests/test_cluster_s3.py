"""A cluster harvest straight into object storage (issue 19, part 1): `dask scheduler` and `dask worker`
processes started by hand on 127.0.0.1 write into moto's S3 server, with no filesystem shared with the
client. Every object of the bucket's store is compared with the files of a one-process local harvest of the
same arguments, the root metadata's creation time excepted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from distributed import Client
from tide.cli import app
from tide.harvest.cluster import harvest_on_cluster
from tide.harvest.config import HarvestConfig
from tide.harvest.run import HarvestError, harvest
from tide.store.open import storage_options
from typer.testing import CliRunner

from tests.cluster_helpers import (
    KillFirstWriter,
    assert_same_store,
    by_hand_cluster,
    cli,
    done_flags,
    store_files,
    worker_addresses,
)
from tests.conftest import BUCKET, kill_harvest_mid_run, start_moto

SETTINGS = dict(
    num_samples=12, num_steps=4, batch_size=2, sites=("resid", "mlp"), device="cpu", progress=False
)
ARGS = ["--num-samples", "12", "--num-steps", "4", "--batch-size", "2", "--sites", "resid,mlp"]
ARGS += ["--device", "cpu", "--no-progress"]
runner = CliRunner()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    harvest(HarvestConfig(out=out, **SETTINGS), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def cluster(s3):
    """Workers whose environment holds the credentials and the endpoint (the `s3` fixture's AWS_*)."""
    with by_hand_cluster(2) as address:
        yield address


NO_AWS = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
NO_AWS["AWS_CONFIG_FILE"] = "/nonexistent"


@pytest.fixture(scope="module")
def bare_cluster(s3):
    """Workers with no AWS_* variable at all: they reach the bucket only with what the client ships them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | NO_AWS
    with by_hand_cluster(2, env) as address:
        yield address, env


def test_a_worker_killed_while_it_writes_into_s3(cluster, reference, tmp_path):
    flag, url = tmp_path / "killed", f"s3://{BUCKET}/killed.zarr"
    with Client(cluster, timeout=30) as c:
        c.register_plugin(KillFirstWriter(str(flag)))
    try:
        run = runner.invoke(app, ["harvest", *ARGS, "--out", url, "--scheduler", cluster])
    finally:
        with Client(cluster, timeout=30) as c:
            c.unregister_worker_plugin(KillFirstWriter.name)
    assert run.exit_code == 0, run.output
    assert flag.exists(), "no worker was killed"
    assert_same_store(url, reference)


def test_the_client_killed_then_run_again_resumes(cluster, reference):
    url = f"s3://{BUCKET}/client-killed.zarr"
    cmd = cli(*ARGS, "--out", url, "--scheduler", cluster)
    partial = kill_harvest_mid_run(cmd, dict(os.environ), lambda: done_flags(url))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    kept = re.search(r"(\d+) already done", again.stderr)
    assert kept and int(kept.group(1)) >= partial.sum(), again.stderr  # tasks left running may finish more
    assert_same_store(url, reference)


def test_credentials_in_storage_options_reach_the_workers_and_are_not_recorded(
    bare_cluster, s3, reference, monkeypatch
):
    address, _ = bare_cluster
    key, secret = "TIDETESTKEY0123", "tide-secret-5b9e1f"
    options = {
        "key": key,
        "secret": secret,
        "endpoint_url": s3["AWS_ENDPOINT_URL"],
        "region_name": "us-east-1",
    }
    url = f"s3://{BUCKET}/options.zarr"
    with monkeypatch.context() as m:  # the client has no AWS_* either
        for name in s3:
            m.delenv(name)
        for name, value in NO_AWS.items():
            m.setenv(name, value)
        args = [
            "harvest",
            *ARGS,
            "--out",
            url,
            "--scheduler",
            address,
            "--storage-options",
            json.dumps(options),
        ]
        run = runner.invoke(app, args)
    assert run.exit_code == 0, run.output
    assert_same_store(url, reference)
    leaked = [n for n, data in store_files(url).items() if key.encode() in data or secret.encode() in data]
    assert not leaked, f"credentials written into {leaked}"
    assert secret not in run.output


def test_workers_without_credentials_are_named_before_any_work(bare_cluster, s3):
    address, _ = bare_cluster
    url = f"s3://{BUCKET}/no-credentials.zarr"
    # The client has the credentials (in its environment), the workers none.
    run = runner.invoke(app, ["harvest", *ARGS, "--out", url, "--scheduler", address])
    assert run.exit_code == 2, run.output
    err = run.output.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in run.output, run.output
    assert "no credentials" in err and "--storage-options" in err and url in err, err
    assert all(worker in err for worker in worker_addresses(address)), err
    assert not done_flags(url).any()


def _stop_once_a_chunk_is_done(server, url: str) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            flags = done_flags(url)
            if flags is not None and flags.any():
                server.stop()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_s3_server_lost_mid_run_names_chunk_worker_and_cause_then_resumes(cluster, s3, reference):
    """The harvest goes through a second server on the same moto state, stopped once a chunk is done."""
    server = start_moto()
    host, port = server.get_host_and_port()
    url, options = f"s3://{BUCKET}/server-lost.zarr", {"endpoint_url": f"http://{host}:{port}"}
    with Client(cluster, timeout=30) as client:
        watcher = _stop_once_a_chunk_is_done(server, url)  # it reads through the module's server
        with storage_options(options), pytest.raises(HarvestError) as e:
            harvest_on_cluster(HarvestConfig(out=url, **SETTINGS), client, log=lambda m: None)
        watcher.join(timeout=5)
        msg = str(e.value)
        worker = r"dask worker tcp://127\.0\.0\.1:\d+ \(host .+, pid \d+\)"
        assert re.search(rf"sample chunk \d+ failed on {worker}: {re.escape(url)}: cannot connect", msg), msg
        assert "run the same command again" in msg and "\n" not in msg, msg
        assert 0 < done_flags(url).sum() < 12
        server = start_moto(port)  # the server is back: the same call resumes
        try:
            with storage_options(options):
                result = harvest_on_cluster(HarvestConfig(out=url, **SETTINGS), client, log=lambda m: None)
        finally:
            server.stop()
    assert 0 < result.written < 12
    assert_same_store(url, reference)
