"""Helpers of the dask cluster tests: comparing stores file by file, the fault a worker plugin injects, and
the command line of a harvest run in another process."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import cloudpickle
from distributed.diagnostics.plugin import WorkerPlugin

# The plugins below are defined here; workers (other processes, maybe started by hand) unpickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store by relative path; the root zarr.json without its creation time."""
    files = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            if f.relative_to(path).as_posix() == "zarr.json":
                meta = json.loads(data)
                del meta["attributes"]["created"]
                data = json.dumps(meta, sort_keys=True).encode()
            files[f.relative_to(path).as_posix()] = data
    return files


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = store_files(a), store_files(b)
    assert fa.keys() == fb.keys()
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"files that differ: {differ}"
    assert any(name.startswith("stats/") for name in fa) and len(fa) > 50


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
