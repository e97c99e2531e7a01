"""Codecs (issue 20): every codec reads back the same values on every read path; `tide store pack --codec`
recompresses a store into a zip that reads bitwise the same, keeps the store's identity and verifies sound."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import zarr
from tide.cli import app
from tide.harvest.config import HarvestConfig
from tide.harvest.run import harvest
from tide.store.reader import ChunkError, open_store, read_into
from tide.store.schema import CODECS, DEFAULT_CODEC, chunk_region
from tide.train.fit.data import ActivationLoader
from typer.testing import CliRunner
from zarr.codecs import BloscCodec, Crc32cCodec

from tests.factories import harvest_config, harvested, synthetic_store

runner = CliRunner()


def _every_read(store) -> dict[str, np.ndarray]:
    """Each array read three ways: zarr-python's own pipeline, tide's chunk reader chunk by chunk, and the
    training loader's shuffled batches (rows put back in place by their sample and step)."""
    out = {}
    for name in store.meta.act_names():
        arr = store.array(name)
        out[f"{name}/zarr"] = arr[:]
        direct = np.empty(arr.shape, arr.dtype)
        for coords in np.ndindex(*arr.cdata_shape):
            region = chunk_region(coords, arr.shape, arr.chunks)
            read_into(arr, region, direct[region])
        out[f"{name}/direct"] = direct
    lay = store.layout
    loader = ActivationLoader(store, store.meta.act_names(), store.done_chunks(), 32, window_rows=64, seed=3)
    rows = np.zeros((len(store.meta.act_names()), lay.num_samples, lay.num_steps, lay.tokens, lay.d_model))
    seen = np.zeros((lay.num_samples, lay.num_steps), dtype=int)
    for b in loader.batches(epochs=1):
        x = b.x_ABD.float().numpy()
        for j, (i, s) in enumerate(zip(b.sample_B.tolist(), b.step_B.tolist(), strict=True)):
            rows[:, i, s, seen[i, s]] = x[:, j]  # tokens of one (sample, step) in any order: sorted below
            seen[i, s] += 1
    out["loader"] = np.sort(rows, axis=3)
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_store_written_with_each_codec_reads_bitwise_equal(tmp_path, dtype):
    reads = {}
    for codec in CODECS:
        store = synthetic_store(
            tmp_path / f"{codec}.zarr", num_samples=8, num_steps=6, tokens=4, d_model=16, batch_size=4,
            steps_per_chunk=4, layers=(0, 1), dtype=dtype, codec=codec, values="random",
        )  # fmt: skip
        assert store.meta.codec == codec
        reads[codec] = _every_read(store)
    reference = reads["none"]
    for codec, read in reads.items():
        for key, values in read.items():
            assert values.tobytes() == reference[key].tobytes(), (codec, key)
    for name in ("resid_l00", "resid_l01"):  # the three paths agree with one another too
        assert reference[f"{name}/direct"].tobytes() == reference[f"{name}/zarr"].tobytes()
    assert DEFAULT_CODEC == "none" and HarvestConfig().codec == DEFAULT_CODEC


@pytest.fixture(scope="module")
def dit_store(tiny_dit, tmp_path_factory):
    """A real harvest (token_index included) with the default codec."""
    out = tmp_path_factory.mktemp("codec") / "h.zarr"
    return harvested(tiny_dit, out, num_samples=6, num_steps=4, layers="0,2", token_fraction=0.5)


def test_pack_codec_recompresses_and_reads_back_bitwise(dit_store, tmp_path):
    source = open_store(dit_store)
    assert source.meta.codec == "none"
    packed = tmp_path / "small.zarr.zip"
    result = runner.invoke(
        app, ["store", "pack", str(dit_store), "--out", str(packed), "--codec", "blosc-zstd"]
    )
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(packed) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        card = z.read("README.md").decode()
        zipped_bytes = sum(i.file_size for i in z.infolist() if i.filename.startswith("resid_l00/c/"))
    zipped = open_store(packed)
    assert zipped.meta.codec == "blosc-zstd" and "codec blosc-zstd" in card
    assert zipped.identity() == source.identity()  # SAEs trained on the folder evaluate on the zip
    for name in [*source.meta.act_names(), "token_index"]:
        codecs = zipped.root[name].metadata.codecs
        assert isinstance(codecs[1], BloscCodec) and isinstance(codecs[-1], Crc32cCodec), name
        assert zipped.root[name][:].tobytes() == source.root[name][:].tobytes(), name
    for key, values in _every_read(zipped).items():
        assert values.tobytes() == _every_read(source)[key].tobytes(), key
    # The chunks are smaller than the folder's, and every one of them passes a full verify.
    chunks = [p for p in (dit_store / "resid_l00" / "c").rglob("*") if p.is_file()]
    assert zipped_bytes < 0.95 * sum(p.stat().st_size for p in chunks)
    ok = runner.invoke(app, ["store", "verify", str(packed)])
    assert ok.exit_code == 0 and "is a sound tide store" in ok.output, ok.output

    # And back: the zip unpacked to no compression again reads the same.
    back = tmp_path / "back.zarr.zip"
    assert (
        runner.invoke(app, ["store", "pack", str(packed), "--out", str(back), "--codec", "none"]).exit_code
        == 0
    )
    again = open_store(back)
    assert again.meta.codec == "none" and again.identity() == source.identity()
    for name in source.meta.act_names():
        assert again.root[name][:].tobytes() == source.root[name][:].tobytes()


def test_pack_codec_refuses_a_damaged_chunk_and_an_unknown_codec(tmp_path):
    store = synthetic_store(
        tmp_path / "s.zarr", num_samples=8, num_steps=4, tokens=4, d_model=8, batch_size=4
    )
    chunk = tmp_path / "s.zarr" / "resid_l00" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChunkError, match=str(chunk)):
        from tide.store.pack import pack

        pack(store.path, tmp_path / "p.zip", "blosc-zstd")
    assert not list(tmp_path.glob("p.zip*"))  # nothing half-written is left
    bad = runner.invoke(
        app, ["store", "pack", str(store.path), "--out", str(tmp_path / "q.zip"), "--codec", "lz5"]
    )
    assert bad.exit_code != 0 and "lz5" in bad.output and "blosc-zstd" in bad.output
    assert zarr.open_group(str(store.path), mode="r").attrs["codec"] == DEFAULT_CODEC


def test_a_store_of_another_codec_resumes_in_its_own_codec(tiny_dit, tmp_path):
    """A store harvested with blosc-zstd (the default before none) and cut short resumes under today's default
    without naming its codec: the samples written on resume are in the store's codec, and the store ends
    bitwise equal to an uninterrupted blosc-zstd harvest. (The resume refused it, naming the codec.)"""
    import shutil

    from tide.store.writer import everything

    from tests.cluster_helpers import assert_same_store

    settings = dict(num_samples=6, num_steps=3, layers="1")
    whole = harvested(tiny_dit, tmp_path / "whole.zarr", codec="blosc-zstd", **settings)
    cut = tmp_path / "cut.zarr"
    shutil.copytree(whole, cut)
    everything(zarr.open_group(str(cut), mode="r+")["done"])[2:] = False  # as if killed after one batch
    said: list[str] = []
    result = harvest(harvest_config(tiny_dit, cut, **settings), log=said.append)
    assert result.written == 4
    assert any("resumed in the store's own codec blosc-zstd" in m for m in said), said
    assert open_store(cut).meta.codec == "blosc-zstd"
    assert_same_store(whole, cut)
