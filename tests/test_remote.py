"""Stores at URLs (issue 10), against real servers on loopback that the tests start and stop: moto's S3
server for s3:// and http.server for http://."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.numpy import load_file
from tide.cli import app
from tide.harvest.config import DEMO_MODEL
from tide.store.open import where, zarr_store
from tide.store.reader import open_store
from tide.store.timeouts import RETRIES, TIMEOUT_S
from tide.train.fit.config import TrainConfig
from tide.train.fit.trainer import train
from typer.testing import CliRunner
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from tests.conftest import BUCKET, kill_harvest_mid_run
from tests.factories import random_store, train_config

runner = CliRunner()


@pytest.fixture
def serve():
    """serve(folder) -> the http:// URL of a web server on 127.0.0.1 serving `folder`; stopped after the test."""
    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    def start(folder: Path) -> str:
        handler = functools.partial(Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def upload(folder: Path, url: str) -> str:
    """Copy a local store to an s3:// URL key by key (what `aws s3 sync` would do)."""
    src, dst = zarr_store(where(folder)), zarr_store(where(url), "w")

    async def copy() -> None:
        async for key in src.list():
            await dst.set(key, await src.get(key, prototype=default_buffer_prototype()))

    sync(copy())
    return url


def arrays(root: zarr.Group) -> dict[str, np.ndarray]:
    names = [n for n, _ in root.arrays()] + [
        f"stats/{g}/{a}" for g, grp in root["stats"].groups() for a, _ in grp.arrays()
    ]
    return {n: root[n][:] for n in names}


def demo_args(out) -> list[str]:
    return [
        "harvest",
        "--model",
        str(DEMO_MODEL),
        "--out",
        str(out),
        "--num-samples",
        "4",
        "--num-steps",
        "4",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]


def test_harvest_into_s3_equals_local_bitwise(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old bug wrote a local folder `s3:/...`: it must not appear here
    url = f"s3://{BUCKET}/demo.zarr"
    remote = runner.invoke(app, demo_args(url))
    assert remote.exit_code == 0, remote.output
    assert "free-disk check is skipped for an object store" in remote.output
    assert not (tmp_path / "s3:").exists()
    assert sync(zarr_store(where(url)).exists("README.md")), "the harvest writes the dataset card"
    local = runner.invoke(app, demo_args(tmp_path / "demo.zarr"))
    assert local.exit_code == 0, local.output
    remote_meta, local_meta = open_store(url).meta, open_store(tmp_path / "demo.zarr").meta
    assert remote_meta.model_copy(update={"created": ""}) == local_meta.model_copy(update={"created": ""})
    a, b = arrays(open_store(url).root), arrays(open_store(tmp_path / "demo.zarr").root)
    assert a.keys() == b.keys() and "resid_l00" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    again = runner.invoke(app, demo_args(url))
    assert again.exit_code == 0 and "already complete" in again.output


def _tiny_args(model, out) -> list[str]:
    args = ["harvest", "--model", str(model), "--out", str(out), "--num-samples", "8", "--num-steps", "60"]
    args += ["--batch-size", "2", "--token-fraction", "0.5", "--device", "cpu", "--no-progress"]
    return [sys.executable, "-c", "from tide.cli import app; app()", *args]


def _done(url: str) -> np.ndarray | None:
    try:
        return zarr.open_array(zarr_store(where(url)), path="done", mode="r")[:]
    except Exception:  # not created yet
        return None


def test_killed_harvest_into_s3_resumes_to_the_uninterrupted_result(s3, tiny_dit, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    url = f"s3://{BUCKET}/killed.zarr"
    partial = kill_harvest_mid_run(_tiny_args(tiny_dit, url), env, lambda: _done(url))
    resumed = subprocess.run(_tiny_args(tiny_dit, url), env=env, capture_output=True, text=True, check=True)
    assert f"{int(partial.sum())} already done" in resumed.stderr
    clean = tmp_path / "clean.zarr"
    subprocess.run(_tiny_args(tiny_dit, clean), env=env, capture_output=True, check=True)
    a, b = arrays(open_store(url).root), arrays(open_store(clean).root)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("remote") / "s.zarr"
    random_store(folder)
    return folder


@pytest.fixture(scope="module")
def small_blosc(tmp_path_factory) -> Path:
    """`small` compressed: verify --quick reads its frame headers (an uncompressed chunk has none to read)."""
    folder = tmp_path_factory.mktemp("remote") / "b.zarr"
    random_store(folder, codec="blosc-zstd")
    return folder


def _train_cfg(store, out) -> TrainConfig:
    return train_config(
        store, out, archs=("tide", "topk"), k=(4,), batch_size=32, max_steps=4, val_fraction=0.25,
        window_rows=128, device="cpu",
    )  # fmt: skip


def _weights(result) -> dict[str, np.ndarray]:
    return {f"{p.name}/{k}": v for p in result.saes for k, v in load_file(p / "sae.safetensors").items()}


def test_train_from_s3_gives_the_weights_of_the_local_copy(s3, small, tmp_path):
    url = upload(small, f"s3://{BUCKET}/train.zarr")
    remote = train(_train_cfg(url, tmp_path / "remote"), log=lambda m: None)
    local = train(_train_cfg(small, tmp_path / "local"), log=lambda m: None)
    a, b = _weights(remote), _weights(local)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_info_and_verify_over_http(small, serve):
    url = serve(small.parent) + "/s.zarr"
    info = runner.invoke(app, ["store", "info", url])
    assert info.exit_code == 0 and "16 / 16" in info.output, info.output
    ok = runner.invoke(app, ["store", "verify", url])
    assert ok.exit_code == 0 and f"ok: {url} is a sound tide store" in ok.output, ok.output


# --- bad input: one line naming the URL and the fix ----------------------------------------------------


def _one_line_error(args: list[str], *expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code != 0, result.output
    line = result.output.strip()
    assert "Traceback" not in line and len(line.splitlines()) == 1, line
    for text in expected:
        assert text in line, line


def test_unknown_scheme():
    _one_line_error(
        ["store", "info", "ftp://host/x.zarr"], "ftp://host/x.zarr", "unknown scheme 'ftp://'", "s3://"
    )


def test_missing_optional_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "obstore.store", None)  # importing it now fails, as when not installed
    _one_line_error(
        ["store", "info", f"s3://{BUCKET}/x.zarr"], f"s3://{BUCKET}/x.zarr", "pip install obstore"
    )


def test_missing_credentials(s3, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    url = f"s3://{BUCKET}/x.zarr"
    _one_line_error(["store", "info", url], url, "no credentials", "AWS_ACCESS_KEY_ID")


def test_credentials_from_an_aws_profile(s3, small, tmp_path, monkeypatch):
    # obstore alone does not read ~/.aws profiles; tide passes it boto3's credential chain.
    url = upload(small, f"s3://{BUCKET}/profile.zarr")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    credentials = tmp_path / "credentials"
    credentials.write_text("[tide]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "tide")
    result = runner.invoke(app, ["store", "info", url])
    assert result.exit_code == 0 and "16 / 16" in result.output, result.output


def test_missing_bucket(s3):
    url = "s3://no-such-bucket/x.zarr"
    _one_line_error(["store", "info", url], url, "bucket 'no-such-bucket' does not exist")
    _one_line_error(demo_args(url), url, "bucket 'no-such-bucket' does not exist")


def test_missing_store_in_a_bucket(s3):
    url = f"s3://{BUCKET}/nothing-here.zarr"
    _one_line_error(["store", "info", url], url, "does not exist", f"tide harvest --out {url}")


def test_http_404(small, serve):
    url = serve(small.parent) + "/missing.zarr"
    _one_line_error(["store", "info", url], url, "HTTP 404", "check the URL")
    _one_line_error(["store", "verify", url], url, "HTTP 404")


@pytest.mark.parametrize(
    "out",
    [
        "http://127.0.0.1:1/x.zarr",
        "https://example.org/x.zarr",
        "hf://datasets/org/name/x.zarr",
        "x.zarr.zip",
    ],
)
def test_read_only_url_as_out(out):
    # Refused before the model is loaded or anything is written.
    _one_line_error(demo_args(out), out, "tide only reads", "s3://")


def test_hf_url_reaches_huggingface_hubs_filesystem(monkeypatch):
    # The hub cannot be reached from the test machine: check the URL handling up to the filesystem call.
    from zarr.storage import FsspecStore

    seen = {}

    def from_url(url, storage_options=None, read_only=False):
        seen.update(url=url, read_only=read_only)
        raise ImportError("no network in tests")

    monkeypatch.setattr(FsspecStore, "from_url", from_url)
    url = "hf://datasets/org/name/h.zarr"
    assert where(url).scheme == "hf" and not where(url).writable
    _one_line_error(["store", "info", url + "/"], url, "pip install huggingface_hub")
    assert seen == {"url": url, "read_only": True}
    _one_line_error(["store", "info", "hf://org/name/h.zarr"], "hf://datasets/ORG/NAME/PATH.zarr")


# --- reading remote stores: many requests in flight, headers only for --quick ----------------------------


@pytest.fixture
def gets(monkeypatch):
    """Every ObjectStore.get as (key, byte range, bytes returned), with the most requests in flight at once;
    each waits 20 ms first, a round trip's latency, so that requests overlap as they would over a network."""
    import asyncio

    from zarr.storage import ObjectStore

    log = {"calls": [], "heads": [], "now": 0, "peak": 0}
    real = ObjectStore.get

    async def get(self, key, prototype, byte_range=None):
        log["now"] += 1
        log["peak"] = max(log["peak"], log["now"])
        try:
            await asyncio.sleep(0.02)
            buf = await real(self, key, prototype, byte_range)
        finally:
            log["now"] -= 1
        log["calls"].append((key, byte_range, 0 if buf is None else len(buf)))
        return buf

    monkeypatch.setattr(ObjectStore, "get", get)
    for method in ("exists", "getsize"):  # HEAD requests

        def head(self, key, _real=getattr(ObjectStore, method), _name=method):
            log["heads"].append((_name, key))
            return _real(self, key)

        monkeypatch.setattr(ObjectStore, method, head)
    return log


def _epoch(store, read_threads: int = 2) -> list[np.ndarray]:
    from tide.train.fit.data import ActivationLoader

    name = store.meta.act_names()[0]
    loader = ActivationLoader(
        store, [name], store.done_chunks(), 16, window_rows=64, seed=3, read_threads=read_threads
    )
    return [
        np.concatenate([b.x_ABD.float().numpy().ravel(), b.t_B.numpy()]) for b in loader.batches(epochs=1)
    ]


def test_loader_keeps_more_chunk_requests_in_flight_than_read_threads(s3, small, gets):
    url = upload(small, f"s3://{BUCKET}/flight.zarr")
    remote, local = _epoch(open_store(url)), _epoch(open_store(small))
    assert len(remote) == len(local) > 0
    for a, b in zip(remote, local, strict=True):
        np.testing.assert_array_equal(a, b)
    chunk_gets = [c for c in gets["calls"] if c[0].startswith("resid_l00/c/")]
    assert chunk_gets and all(r is None for _, r, _ in chunk_gets), "one whole GET per chunk"
    assert len(chunk_gets) == len({k for k, _, _ in chunk_gets}), "each chunk fetched once per epoch"
    assert not gets["heads"], gets["heads"]
    assert gets["peak"] > 2, f"at most {gets['peak']} requests in flight with 2 read threads"


def test_missing_chunk_on_s3_is_named(s3, small):
    from tide.store.reader import StoreError

    url = upload(small, f"s3://{BUCKET}/holed.zarr")
    sync(zarr_store(where(url), "w").delete("resid_l00/c/1/0/0/0"))
    with pytest.raises(StoreError, match=r"resid_l00/c/1/0/0/0 \(samples 4\.\.7.*is missing"):
        _epoch(open_store(url))


def test_verify_quick_on_s3_fetches_headers_not_chunks(s3, small_blosc, gets):
    url = upload(small_blosc, f"s3://{BUCKET}/quick.zarr")
    ok = runner.invoke(app, ["store", "verify", url, "--quick"])
    assert ok.exit_code == 0, ok.output
    chunk_gets = [c for c in gets["calls"] if c[0].startswith("resid_l00/c/")]
    assert chunk_gets, "the blosc headers are read"
    assert all(r is not None and n <= 16 for _, r, n in chunk_gets), chunk_gets
    assert not [k for _, k in gets["heads"] if k.startswith("resid_l00/c/")], "sizes come from the listing"
    key = "resid_l00/c/2/0/0/0"
    zs = zarr_store(where(url), "w")
    whole = sync(zs.get(key, prototype=default_buffer_prototype())).to_bytes()
    sync(zs.set(key, default_buffer_prototype().buffer.from_bytes(whole[:-9])))
    bad = runner.invoke(app, ["store", "verify", url, "--quick"])
    assert bad.exit_code != 0 and key in bad.output and "truncated" in bad.output, bad.output


def _no_env_credentials(monkeypatch, s3) -> str:
    """Remove the endpoint and keys from the environment; returns --storage-options JSON that gives them back,
    in s3fs's spelling."""
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    return json.dumps({"endpoint_url": s3["AWS_ENDPOINT_URL"], "key": "testing", "secret": "testing"})


def test_store_stats_takes_storage_options(s3, small, monkeypatch, gets):
    url = upload(small, f"s3://{BUCKET}/stats.zarr")
    options = _no_env_credentials(monkeypatch, s3)
    result = runner.invoke(app, ["store", "stats", url, "--storage-options", options])
    assert result.exit_code == 0 and "resid_l00: stored sums match" in result.output, result.output
    assert not [k for _, k in gets["heads"] if k.startswith("resid_l00/c/")], "chunks are listed, not HEADed"
    _one_line_error(["store", "stats", url], url)  # the same without the options cannot reach the server
    bad = json.dumps({**json.loads(options), "no_such_option": 1})
    _one_line_error(["store", "stats", url, "--storage-options", bad], url, "no_such_option", "obstore")


def test_eval_from_s3_equals_eval_from_the_local_copy(s3, small, tmp_path):
    url = upload(small, f"s3://{BUCKET}/eval.zarr")
    run = train(_train_cfg(small, tmp_path / "run"), log=lambda m: None)
    results = {}
    for label, store in (("s3", url), ("local", str(small))):
        out = tmp_path / f"{label}.json"
        r = runner.invoke(app, ["eval", *map(str, run.saes), "--store", store, "--json", str(out)])
        assert r.exit_code == 0, r.output
        results[label] = json.loads(out.read_text())
    assert results["s3"] == results["local"] and results["s3"]


def test_gs_url_reaches_obstores_gcs_store(monkeypatch):
    # No GCS server can be reached from the tests: check the URL handling up to the object store's constructor.
    import obstore.store
    from zarr.storage import ObjectStore

    store = zarr_store(where("gs://bkt/data/h.zarr"), "w")
    assert isinstance(store, ObjectStore) and not store.read_only
    assert type(store.store).__name__ == "GCSStore"
    assert (store.store.config["bucket"], store.store.prefix) == ("bkt", "data/h.zarr")
    assert where("gs://bkt/h.zarr").writable and where("gcs://bkt/h.zarr").writable
    seen = []

    def from_url(url, **options):
        seen.append((url, options))
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(obstore.store, "from_url", from_url)
    options = json.dumps({"service_account_path": "/key.json"})
    _one_line_error(["store", "info", "gcs://bkt/h.zarr", "--storage-options", options], "gcs://bkt/h.zarr")
    # The user's options reach obstore as given, with tide's timeouts and retry budget (store/timeouts.py).
    [(url, given)] = seen
    assert url == "gs://bkt/h.zarr" and given["service_account_path"] == "/key.json"
    assert given["client_options"]["timeout"] == f"{TIMEOUT_S:g}s"
    assert given["retry_config"]["max_retries"] == RETRIES


def test_overwrite_replaces_a_tide_store_on_s3(s3, small, tiny_dit):
    url = upload(small, f"s3://{BUCKET}/over.zarr")
    args = ["harvest", "--model", str(tiny_dit), "--out", url, "--num-samples", "2", "--num-steps", "2"]
    args += ["--batch-size", "2", "--device", "cpu", "--no-progress"]
    refused = runner.invoke(app, args)
    assert refused.exit_code != 0 and "--overwrite" in refused.output, refused.output
    replaced = runner.invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    store = open_store(url)
    assert store.meta.model.path == str(tiny_dit) and store.done().all()
    keys = sync(_keys(zarr_store(where(url))))
    assert not [k for k in keys if k.startswith("resid_l00/c/") and k.split("/")[2] not in ("0",)], keys


async def _keys(zstore) -> list[str]:
    return [k async for k in zstore.list()]


def _put(url: str, key: str, data: bytes) -> None:
    from zarr.core.buffer import cpu

    sync(zarr_store(where(url), "w").set(key, cpu.Buffer.from_bytes(data)))


def _get(url: str, key: str) -> bytes | None:
    buf = sync(zarr_store(where(url)).get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def test_overwrite_on_s3_never_deletes_a_key_tide_did_not_write(s3, small, tiny_dit):
    url = upload(small, f"s3://{BUCKET}/deep.zarr")
    foreign = {
        "resid_l00/notes.txt": b"mine",
        "analysis/zarr.json": b'{"zarr_format": 3, "node_type": "group"}',
        "analysis/thesis.tex": b"years of work",
        "resid_l00/c/99/0/0/0": b"outside the grid",
    }
    for key, data in foreign.items():
        _put(url, key, data)
    args = ["harvest", "--model", str(tiny_dit), "--out", url, "--num-samples", "2", "--num-steps", "2"]
    args += ["--batch-size", "2", "--device", "cpu", "--no-progress", "--overwrite"]
    refused = runner.invoke(app, args)
    assert (
        refused.exit_code == 2
        and "analysis/thesis.tex (and 3 more), which tide did not write" in refused.output
    )
    assert all(_get(url, key) == data for key, data in foreign.items())
    assert open_store(url).meta.num_samples == open_store(small).meta.num_samples  # the store is untouched
    for key in foreign:
        sync(zarr_store(where(url), "w").delete(key))
    replaced = runner.invoke(app, args)
    assert replaced.exit_code == 0, replaced.output
    assert open_store(url).meta.num_samples == 2 and open_store(url).done().all()


def test_card_out_to_s3_writes_the_key_and_keeps_someone_elses(s3, small):
    from tide.store.card import card_text

    out = f"s3://{BUCKET}/repo/README.md"
    result = runner.invoke(app, ["store", "card", str(small), "--out", out])
    assert result.exit_code == 0, result.output
    assert _get(f"s3://{BUCKET}/repo", "README.md").decode() == card_text(open_store(small))
    assert (
        runner.invoke(app, ["store", "card", str(small), "--out", out]).exit_code == 0
    )  # its own: rewritten
    _put(f"s3://{BUCKET}/repo", "README.md", b"# my dataset\n")
    result = runner.invoke(app, ["store", "card", str(small), "--out", out])
    assert result.exit_code == 2 and "not a dataset card tide wrote" in result.output, result.output
    assert _get(f"s3://{BUCKET}/repo", "README.md") == b"# my dataset\n"


def test_cancelled_fetches_stop(s3, small, gets):
    # A loader that stops (closed early, or a damaged chunk) cancels the requests it started ahead.
    import time

    from tide.store.remote import fetch_ahead

    store = open_store(upload(small, f"s3://{BUCKET}/cancel.zarr"))
    arr = store.array("resid_l00")
    reads = store.layout.chunk_reads(store.done_chunks())
    fetches = fetch_ahead(arr, [r.selection for r in reads])
    assert all(f is not None for f in fetches.futures) and len(fetches.futures) == len(reads) > 1
    fetches.cancel()
    time.sleep(0.3)  # each request waits 20 ms before it is sent (the `gets` fixture)
    assert not [c for c in gets["calls"] if c[0].startswith("resid_l00/c/")], gets["calls"]
    assert all(f.cancelled() for f in fetches.futures)
