"""Helpers of the dask cluster tests: comparing stores file by file (a folder or an s3:// URL), a cluster
started by hand as docs/cluster.md starts one, the fault a worker plugin injects, and the command line of a
harvest run in another process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cloudpickle
import numpy as np
import zarr
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin
from tide.store.open import is_url, where, zarr_store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

# The plugins below are defined here; workers (other processes, maybe started by hand) unpickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _without_created(name: str, data: bytes) -> bytes:
    """The root zarr.json without its creation time (the one thing two harvests' stores may differ in)."""
    if name != "zarr.json":
        return data
    meta = json.loads(data)
    del meta["attributes"]["created"]
    return json.dumps(meta, sort_keys=True).encode()


def store_files(store: Path | str) -> dict[str, bytes]:
    """Every file (object) of a store, a folder or an s3:// URL, by relative path (key)."""
    if is_url(store):
        zstore = zarr_store(where(store))

        async def read() -> dict[str, bytes]:
            return {
                key: (await zstore.get(key, prototype=default_buffer_prototype())).to_bytes()
                async for key in zstore.list()
            }

        raw = sync(read())
    else:
        raw = {f.relative_to(store).as_posix(): f.read_bytes() for f in Path(store).rglob("*") if f.is_file()}
    return {name: _without_created(name, data) for name, data in sorted(raw.items())}


def assert_same_store(a: Path | str, b: Path | str) -> None:
    """Stores `a` and `b` hold the same files with the same bytes, the root's creation time excepted."""
    fa, fb = store_files(a), store_files(b)
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"files that differ: {differ}"
    assert any(name.startswith("stats/") for name in fa) and any("/c/" in name for name in fa)


def done_flags(store: Path | str) -> np.ndarray | None:
    """The store's `done` flags; None before the store exists."""
    try:
        return zarr.open_array(zarr_store(where(store)), path="done", mode="r")[:]
    except Exception:  # not created yet
        return None


@contextmanager
def by_hand_cluster(workers: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """`dask scheduler` and `workers` x `dask worker --nthreads 1` processes on 127.0.0.1, started as
    docs/cluster.md starts them, with `env` (default: this process's); yields the scheduler's address and
    stops them all after."""
    dask = str(Path(sys.executable).parent / "dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], **quiet
        )
    ]
    try:
        procs += [
            subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-dashboard"], **quiet)
            for _ in range(workers)
        ]
        with Client(address, timeout=60) as c:
            c.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def worker_addresses(address: str) -> list[str]:
    """The addresses of the workers of the scheduler at `address`."""
    with Client(address, timeout=30) as c:
        return list(c.scheduler_info()["workers"])


class KillFirstWriter(WorkerPlugin):
    """SIGKILLs its worker process right after the first activation block it writes, once across the
    cluster (the flag file says it happened): the chunk's other blocks and its done flag are never written."""

    name = "kill-first-writer"

    def __init__(self, flag: str):
        self.flag = flag

    def setup(self, worker):
        from tide.store.writer import StoreWriter

        flag, real = Path(self.flag), StoreWriter.write_block

        def write_block(writer, *args):
            real(writer, *args)
            if not flag.exists():
                flag.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

        StoreWriter.write_block = write_block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from tide.cli import app; app()", "harvest", *args]
