"""Remote stores that fail (issue 24): a server answering HTTP 500, one that hangs, an S3 endpoint that never
answers, and an S3 server that dies in the middle of a harvest. Each ends within a bounded time in one
`error:` line naming the URL and what to do; a harvest says what it kept, and resumes once the server is back.
Real servers on 127.0.0.1: http.server and moto's S3 server."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tide.store.timeouts as timeouts
from tide.cli import app
from tide.store.reader import open_store
from typer.testing import CliRunner

from tests.conftest import moto_env, start_moto
from tests.factories import random_store
from tests.test_remote import arrays

runner = CliRunner()
BUCKET = "tide-unreachable"


def _one_line(args: list[str], *needles: str) -> tuple[str, float]:
    start = time.monotonic()
    result = runner.invoke(app, args)
    took = time.monotonic() - start
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    msg = result.output[result.output.index("error: ") :] if "error: " in result.output else result.output
    assert "Traceback" not in result.output and len(msg.strip().splitlines()) == 1, result.output
    for n in needles:
        assert n in msg, msg
    return msg, took


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flaky") / "s.zarr"
    random_store(folder, num_samples=8, num_steps=3, tokens=4, d_model=8)
    return folder


@pytest.fixture
def misbehaving():
    """misbehaving(folder, mode) -> the URL of a web server on 127.0.0.1 serving `folder`, whose answers to
    chunk requests (paths with /c/) are HTTP 500 (mode "500") or never come (mode "hang"); `hits` counts them."""
    servers, release = [], threading.Event()
    hits: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if "/c/" in self.path:
                hits[self.path] = hits.get(self.path, 0) + 1
                if self.server.mode == "500":
                    self.send_error(500, "Internal Server Error")
                    return
                release.wait(60)  # hung until the test ends
                return
            super().do_GET()

    def start(folder: Path, mode: str) -> str:
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        server.mode, server.daemon_threads = mode, True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    start.hits = hits
    yield start
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def test_http_500_is_tried_again_then_one_line(small, misbehaving, monkeypatch):
    monkeypatch.setattr(timeouts, "FIRST_BACKOFF_S", 0.01)
    url = misbehaving(small.parent, "500") + "/s.zarr"
    msg, took = _one_line(["store", "info", url], f"{url}/done/c/", "answered HTTP 500", "4 times")
    assert "run the command again" in msg and took < 20
    key = msg.split(url, 1)[1].split(":", 1)[0]  # the chunk that failed, e.g. /done/c/0
    assert misbehaving.hits[f"/s.zarr{key}"] == 1 + timeouts.RETRIES  # every try reached the server


def test_hung_http_server_times_out(small, misbehaving, monkeypatch):
    monkeypatch.setattr(timeouts, "TIMEOUT_S", 0.5)
    monkeypatch.setattr(timeouts, "RETRIES", 2)
    url = misbehaving(small.parent, "hang") + "/s.zarr"
    msg, took = _one_line(["store", "verify", url], url, "did not answer within 0.5 s", "3 times")
    assert took < 20, took  # aiohttp's default would wait 5 minutes


def test_training_from_a_failing_http_store_says_so(small, misbehaving, tmp_path, monkeypatch):
    monkeypatch.setattr(timeouts, "FIRST_BACKOFF_S", 0.01)
    url = misbehaving(small.parent, "500") + "/s.zarr"
    args = ["train", "--store", url, "--out", str(tmp_path / "o"), "--max-steps", "2", "--warmup-steps", "1"]
    _one_line([*args, "--batch-size", "8", "--k", "2", "--no-progress", "--no-eval"], "answered HTTP 500")


@pytest.fixture
def silent_endpoint():
    """An S3 endpoint on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    for conn in held:
        conn.close()
    listener.close()


def test_silent_s3_endpoint_times_out_within_the_budget(silent_endpoint, monkeypatch):
    monkeypatch.setattr(timeouts, "TIMEOUT_S", 0.5)
    monkeypatch.setattr(timeouts, "RETRY_BUDGET_S", 1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "t"),
        ("AWS_SECRET_ACCESS_KEY", "t"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(key, value)
    url = f"s3://{BUCKET}/x.zarr"
    msg, took = _one_line(["store", "info", url], url, "cannot connect")
    assert took < 20, took  # obstore's own default: 30 s a request, retried for 3 minutes
    assert "max_retries: 3, retry_timeout: 1s" in msg, msg  # obstore reports the budget it was given
    # The user's own client options win over tide's.
    options = '{"client_options": {"timeout": "0.2s"}, "retry_config": {"max_retries": 0}}'
    msg, _ = _one_line(["store", "info", url, "--storage-options", options], url, "cannot connect")
    assert "retries" not in msg, msg


@pytest.fixture
def moto(monkeypatch):
    """A moto S3 server of its own (the test stops and restarts it), with a bucket; AWS_* point at it."""
    server = start_moto()
    import boto3

    env = moto_env(server)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    servers = {"current": server}

    def restart():  # on the same port; moto keeps its buckets in the process, so the data is still there
        servers["current"] = start_moto(server.get_host_and_port()[1])

    yield server, restart
    if servers["current"]._server is not None:
        servers["current"].stop()


def _harvest(model, out) -> list[str]:
    return [
        "harvest", "--model", str(model), "--out", str(out), "--num-samples", "6", "--num-steps", "3",
        "--batch-size", "2", "--layers", "0", "--token-fraction", "0.5", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def test_s3_server_dying_mid_harvest_says_what_was_kept(moto, tiny_dit, tmp_path, monkeypatch):
    from tide.store.writer import StoreWriter

    server, restart = moto
    real = StoreWriter.write_block

    def write_block(self, name, c, steps, block):
        if c == 1 and server._server is not None:  # the server dies before the second sample chunk
            server.stop()
        real(self, name, c, steps, block)

    monkeypatch.setattr(StoreWriter, "write_block", write_block)
    url = f"s3://{BUCKET}/dying.zarr"
    msg, took = _one_line(
        _harvest(tiny_dit, url), url, "2 of 6 samples had been written completely and are kept"
    )
    assert "resumable" in msg and "run the same command" in msg
    monkeypatch.setattr(StoreWriter, "write_block", real)
    restart()
    resumed = runner.invoke(app, _harvest(tiny_dit, url))
    assert resumed.exit_code == 0 and "6 samples, 2 already done" in resumed.output, resumed.output
    clean = tmp_path / "clean.zarr"
    assert runner.invoke(app, _harvest(tiny_dit, clean)).exit_code == 0
    a, b = arrays(open_store(url).root), arrays(open_store(clean).root)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
