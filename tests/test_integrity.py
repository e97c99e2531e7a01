"""Data integrity: a damaged store is an error that names the chunk file, never data a trainer reads silently.

Damage is made by hand on stores written by the real writer: a flipped byte, a truncated or deleted chunk
file. The reference for "what a reader must see" is the store as written (read before the damage).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from tide.cli import app
from tide.store.reader import ChunkError, MissingChunkWarning, StoreError, open_store, read_into
from tide.store.schema import FORMAT_VERSION
from tide.store.stats import recompute_sums
from tide.store.writer import everything
from tide.train.fit.data import ActivationLoader
from typer.testing import CliRunner
from zarr.codecs import Crc32cCodec

from tests.factories import harvest_config, harvested, random_store, synthetic_store, trained

runner = CliRunner()

# Chunk (1, 1, 1, 0) of the stores below holds samples 3..5, steps 2..3, tokens 2..3.
KEY = "c/1/1/1/0"


def _store(path: Path, codec: str = "blosc-zstd", num_samples: int = 12):
    return random_store(
        path, num_samples=num_samples, num_steps=5, tokens=4, d_model=8, batch_size=3, steps_per_chunk=2,
        tokens_per_chunk=2, codec=codec,
    )  # fmt: skip


def _flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _as_version(path: Path, version: int) -> None:
    """Rewrite a store as format `version` (1 or 2) wrote it: the small arrays (and for version 1 the
    activations too) without crc32c and with zarr's default compressor for the small ones, chunks that hold
    only the fill value left out (zarr's default)."""
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    meta = open_store(path).meta
    data = [*meta.act_names(), "token_index"]
    small = ["timesteps", "step_index", "seed", "label", "done"]
    small += [f"stats/{n}/{s}" for n in meta.act_names() for s in ("count", "sum", "sumsq")]
    for name in small + (meta.act_names() if version == 1 else []):
        old = root[name]
        values, codecs = old[:], list(old.metadata.codecs)
        assert isinstance(codecs[-1], Crc32cCodec)
        new = root.create_array(
            name,
            shape=old.shape,
            dtype=old.dtype,
            chunks=old.chunks,
            fill_value=old.fill_value,
            compressors=(codecs[1:-1] or None) if name in data else "auto",
            dimension_names=old.metadata.dimension_names,
            attributes=dict(old.attrs),
            overwrite=True,
        )
        new[:] = values
    root.attrs.update({"format_version": version})


@pytest.mark.parametrize("codec", ["blosc-zstd", "zstd", "none"])
def test_new_stores_are_version_3_with_a_checksum_and_every_chunk_written(tmp_path, codec):
    store = _store(tmp_path / "s.zarr", codec)
    arr = store.array("resid_l00")
    assert store.meta.format_version == FORMAT_VERSION == 3
    assert isinstance(arr.metadata.codecs[-1], Crc32cCodec)
    info = runner.invoke(app, ["store", "info", str(store.path), "--json"])
    assert json.loads(info.output)["format_version"] == 3
    # A chunk of zeros (the fill value) is still written: a missing file must always mean a lost one.
    root = zarr.open_group(str(store.path), mode="r+", zarr_format=3)
    from tide.store.writer import StoreWriter

    writer = StoreWriter(root, store.meta)
    writer.submit(writer.write_block, "resid_l00", 1, slice(0, 5), np.zeros((3, 5, 4, 8), np.float16))
    writer.close()
    assert (store.path / "resid_l00" / KEY).is_file()
    out = np.full((3, 2, 2, 8), np.nan, np.float16)
    read_into(arr, (slice(3, 6), slice(2, 4), slice(2, 4), slice(None)), out)
    assert (out == 0).all()


@pytest.mark.parametrize("damage", [_flip, _truncate])
@pytest.mark.parametrize("codec", ["blosc-zstd", "zstd", "none"])
def test_a_damaged_chunk_is_an_error_naming_its_file_on_every_path(tmp_path, codec, damage):
    store = _store(tmp_path / "s.zarr", codec)
    arr = store.array("resid_l00")
    file = store.path / "resid_l00" / KEY
    damage(file)
    whole = (slice(3, 6), slice(2, 4), slice(2, 4), slice(None))
    part = (slice(4, 6), slice(3, 4), slice(2, 4), slice(None))
    across = (slice(0, 12), slice(0, 5), slice(0, 4), slice(None))  # many chunks: only zarr's path reads it
    for selection in (whole, part, across):
        for direct in (True, False):
            out = np.empty(
                tuple(len(range(*s.indices(n))) for s, n in zip(selection, arr.shape, strict=True)),
                np.float16,
            )
            with pytest.raises(ChunkError) as e:
                read_into(arr, selection, out, direct=direct)
            msg = str(e.value)
            assert str(file) in msg and "samples 3..5" in msg and "tide store verify" in msg, msg
    if damage is _flip:  # the bytes are all there: only the checksum can tell
        with pytest.raises(ChunkError, match="checksum"):
            read_into(arr, whole, np.empty((3, 2, 2, 8), np.float16))
    loader = ActivationLoader(store, ["resid_l00"], [0, 1, 2, 3], 16)
    with pytest.raises(ChunkError, match=str(file)):
        list(loader.batches(epochs=1))


@pytest.mark.parametrize("codec", ["blosc-zstd", "none"])
def test_a_missing_chunk_is_an_error_not_zeros(tmp_path, codec):
    store = _store(tmp_path / "s.zarr", codec)
    arr = store.array("resid_l00")
    file = store.path / "resid_l00" / KEY
    file.unlink()
    for direct in (True, False):
        with pytest.raises(ChunkError, match="is missing") as e:
            read_into(
                arr,
                (slice(3, 6), slice(2, 4), slice(2, 4), slice(None)),
                np.empty((3, 2, 2, 8), np.float16),
                direct,
            )
        assert str(file) in str(e.value) and "samples 3..5" in str(e.value)
    with pytest.raises(ChunkError, match="is missing"):
        recompute_sums(store, "resid_l00")


def test_version_1_stores_are_read_and_a_missing_chunk_warns(tmp_path):
    store = _store(tmp_path / "s.zarr")
    before = store.root["resid_l00"][:]
    _as_version(store.path, 1)
    v1 = open_store(store.path)
    assert v1.meta.format_version == 1 and not isinstance(
        v1.array("resid_l00").metadata.codecs[-1], Crc32cCodec
    )
    for r in v1.layout.chunk_reads([0, 1, 2, 3]):
        out = np.empty((*r.shape, 8), np.float16)
        read_into(v1.array("resid_l00"), r.selection, out)  # the direct path, with no checksum to check
        np.testing.assert_array_equal(out, before[r.selection])
    result = runner.invoke(app, ["store", "verify", str(store.path)])
    assert result.exit_code == 0, result.output
    (store.path / "resid_l00" / KEY).unlink()
    arr = v1.array("resid_l00")
    for direct in (True, False):
        out = np.full((3, 2, 2, 8), np.nan, np.float16)
        with pytest.warns(MissingChunkWarning, match=KEY):
            read_into(arr, (slice(3, 6), slice(2, 4), slice(2, 4), slice(None)), out, direct)
        assert (out == 0).all()  # what zarr reads: a version-1 store leaves out all-zero chunks
    _truncate(store.path / "resid_l00/c/2/0/0/0")  # no checksum: the blosc header still tells
    for quick in ([], ["--quick"]):
        result = runner.invoke(app, ["store", "verify", str(store.path), *quick])
        assert result.exit_code == 1 and KEY in result.output and "version-1" in result.output
        assert "resid_l00/c/2/0/0/0 (samples 6..8, steps 0..1, tokens 0..1) has" in result.output


def test_version_2_stores_are_read_and_verified_as_before(tmp_path):
    import warnings

    store = _store(tmp_path / "s.zarr")
    before = {n: store.root[n][:] for n in ("timesteps", "label", "seed", "stats/resid_l00/sum")}
    stats_before = store.stats("resid_l00")
    _as_version(store.path, 2)
    v2 = open_store(store.path)
    assert v2.meta.format_version == 2 and not isinstance(v2.root["label"].metadata.codecs[-1], Crc32cCodec)
    # Version 2 left out the small arrays' chunks that hold only the fill value: sample 0..2's labels are
    # 0, 1, 2, so label chunk 0 is there, but a done chunk of samples not yet done is not.
    zarr.open_array(str(store.path / "done"), mode="r+")[9:] = np.zeros(3, bool)  # as version 2 wrote it
    assert not (store.path / "done/c/3").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a chunk left out by design is read without a word
        assert v2.done().tolist() == [True] * 9 + [False] * 3
        for name, values in before.items():
            np.testing.assert_array_equal(v2.read(name), values, err_msg=name)
        np.testing.assert_array_equal(v2.stats("resid_l00", [0, 1, 2, 3]).mean, stats_before.mean)
    result = runner.invoke(app, ["store", "verify", str(store.path)])
    assert result.exit_code == 0 and "incomplete: 9 of 12" in result.output, result.output
    _flip(store.path / "resid_l00" / KEY)  # its activations still carry their checksums
    result = runner.invoke(app, ["store", "verify", str(store.path)])
    assert result.exit_code == 1 and "fails its checksum" in result.output


def test_a_newer_format_version_is_refused_with_the_fix(tmp_path):
    store = _store(tmp_path / "s.zarr")
    zarr.open_group(str(store.path), mode="r+").attrs.update({"format_version": 4})
    with pytest.raises(StoreError, match="format_version 4.*reads versions 1, 2, 3.*upgrade tide"):
        open_store(store.path)


@pytest.mark.parametrize(
    "codec,quick", [("blosc-zstd", False), ("blosc-zstd", True), ("zstd", True), ("none", True)]
)
def test_verify_names_every_missing_or_truncated_chunk_file(tmp_path, codec, quick):
    store = _store(tmp_path / "s.zarr", codec)
    missing, truncated = store.path / "resid_l00/c/0/0/0/0", store.path / "resid_l00" / KEY
    missing.unlink()
    _truncate(truncated)
    args = ["store", "verify", str(store.path)] + (["--quick"] if quick else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert f"{missing} (samples 0..2, steps 0..1, tokens 0..1) is missing" in result.output
    assert f"{truncated} (samples 3..5, steps 2..3, tokens 2..3) has" in result.output
    assert "--reset-damaged" in result.output and "sound" not in result.output
    assert "disagree" not in result.output  # damage is named as damage, not as bad statistics


@pytest.mark.parametrize("codec", ["blosc-zstd", "zstd", "none"])
def test_quick_verify_passes_sound_chunks_of_many_compressed_blocks(tmp_path, codec):
    """Chunks of 192 KiB: several blosc blocks, several zstd blocks (at most 128 KiB each)."""
    store = synthetic_store(
        tmp_path / "s.zarr", num_samples=6, num_steps=4, tokens=4, d_model=8192, batch_size=3,
        steps_per_chunk=2, tokens_per_chunk=2, codec=codec, values="random",
    )  # fmt: skip
    result = runner.invoke(app, ["store", "verify", str(store.path), "--quick"])
    assert result.exit_code == 0, result.output
    _truncate(store.path / "resid_l00/c/1/1/1/0")
    result = runner.invoke(app, ["store", "verify", str(store.path), "--quick"])
    assert result.exit_code == 1 and "resid_l00/c/1/1/1/0" in result.output


def test_verify_names_a_chunk_that_fails_its_checksum(tmp_path):
    store = _store(tmp_path / "s.zarr")
    file = store.path / "resid_l00" / KEY
    _flip(file)
    assert runner.invoke(app, ["store", "verify", str(store.path), "--quick"]).exit_code == 0  # sizes only
    result = runner.invoke(app, ["store", "verify", str(store.path)])
    assert result.exit_code == 1 and f"{file} (samples 3..5" in result.output
    assert "fails its checksum" in result.output


def test_verify_says_a_sound_store_is_incomplete(tmp_path):
    store = _store(tmp_path / "s.zarr")
    result = runner.invoke(app, ["store", "verify", str(store.path)])
    assert result.exit_code == 0 and "incomplete" not in result.output
    # A harvest killed after 2 of 4 batches: the rest is not done, and their chunks may not exist.
    everything(zarr.open_array(str(store.path / "done"), mode="r+"))[6:] = np.zeros(6, bool)
    for f in (store.path / "resid_l00/c/3").rglob("*"):
        if f.is_file():
            f.unlink()
    for quick in ([], ["--quick"]):
        result = runner.invoke(app, ["store", "verify", str(store.path), *quick])
        assert result.exit_code == 0, result.output
        assert "is a sound tide store" in result.output
        assert "incomplete: 6 of 12 samples done" in result.output
        assert f"tide harvest --out {store.path}" in result.output


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_stats_write_refuses_damaged_chunks(tmp_path, damage):
    store = _store(tmp_path / "s.zarr")
    file = store.path / "resid_l00" / KEY
    file.unlink() if damage == "delete" else _flip(file)
    sums_before = store.root["stats/resid_l00/sum"][:]
    for write in ([], ["--write"]):
        result = runner.invoke(app, ["store", "stats", str(store.path), *write])
        assert result.exit_code == 2, result.output
        assert str(file) in result.output and "tide store verify" in result.output
        assert "rewrite them with --write" not in result.output and "Traceback" not in result.output
    np.testing.assert_array_equal(store.root["stats/resid_l00/sum"][:], sums_before)


def test_stats_recomputed_chunk_by_chunk_equal_the_writers(tmp_path):
    store = _store(tmp_path / "s.zarr")
    sums = recompute_sums(store, "resid_l00")
    x = store.root["resid_l00"][:].astype(np.float64)  # the reference: every value, summed plainly
    ref = x.reshape(4, 3, 5, 4, 8).sum(axis=(1, 3))
    np.testing.assert_allclose(sums.sum, ref, rtol=1e-12)
    np.testing.assert_allclose(sums.sumsq, (x**2).reshape(4, 3, 5, 4, 8).sum(axis=(1, 3)), rtol=1e-12)
    assert (sums.count == 3 * 4).all()


def test_train_and_eval_on_a_damaged_store_fail_with_one_paragraph(tmp_path):
    store = _store(tmp_path / "s.zarr")
    folders = trained(store.path, tmp_path / "saes", layers="0", max_steps=2, val_fraction=0.25)
    for c in range(4):  # every sample chunk: whichever are held out, one is damaged
        _truncate(store.path / f"resid_l00/c/{c}/0/0/0")
    result = runner.invoke(app, ["eval", str(folders[0])])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: resid_l00: chunk file ") and "Traceback" not in result.output
    assert "tide store verify" in result.output and result.output.count("\n") == 1
    result = runner.invoke(
        app,
        ["train", "--store", str(store.path), "--out", str(tmp_path / "again"), "--layers", "0",
         "--arch", "topk", "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "16", "--no-progress", "--no-eval"],
    )  # fmt: skip
    assert result.exit_code == 2 and "error: resid_l00: chunk file " in result.output, result.output
    assert "Traceback" not in result.output and "tide store verify" in result.output


def test_reset_damaged_then_the_same_harvest_writes_those_samples_again(tiny_dit, tmp_path):
    settings = dict(num_samples=6, num_steps=3, layers="0,2", token_fraction=0.5)
    out = harvested(tiny_dit, tmp_path / "s.zarr", **settings)
    before = {
        n: zarr.open_array(str(out / n), mode="r")[:] for n in ("resid_l00", "resid_l02", "token_index")
    }
    lost = sorted(p for p in (out / "resid_l02/c/1").rglob("*") if p.is_file())[0]
    lost.unlink()
    _flip(sorted(p for p in (out / "token_index/c/2").rglob("*") if p.is_file())[0])
    result = runner.invoke(app, ["store", "verify", str(out), "--reset-damaged"])
    assert result.exit_code == 1 and str(lost) in result.output
    assert "marked samples 2..3, 4..5 not done" in result.output, result.output
    result = runner.invoke(app, ["store", "verify", str(out)])
    assert result.exit_code == 0 and "incomplete: 2 of 6 samples done" in result.output, result.output
    harvested(tiny_dit, out, **settings)
    result = runner.invoke(app, ["store", "verify", str(out)])
    assert result.exit_code == 0 and "incomplete" not in result.output, result.output
    for name, values in before.items():
        np.testing.assert_array_equal(zarr.open_array(str(out / name), mode="r")[:], values, err_msg=name)


# --- format version 3: every array checksummed, every chunk written, and every read checked ------------------


DIT_RUN = dict(num_samples=8, num_steps=3, layers="1", token_fraction=0.5, save_images=True)
"""The harvest of `dit_run`."""


@pytest.fixture(scope="module")
def dit_run(tiny_dit, tmp_path_factory):
    """A finished harvest holding every kind of array (labels, token_index, images), and a topk SAE on it."""
    work = tmp_path_factory.mktemp("harvested")
    store = harvested(tiny_dit, work / "s.zarr", **DIT_RUN)
    return store, trained(store, work / "saes", layers="1", val_fraction=0.25)[0]


def _arrays_on_disk(path: Path) -> list[str]:
    """Every array of a store folder, by its path inside the store."""
    return sorted(
        str(p.parent.relative_to(path))
        for p in path.rglob("zarr.json")
        if json.loads(p.read_text())["node_type"] == "array"
    )


def _chunk_files(path: Path, name: str) -> list[Path]:
    return sorted(p for p in (path / name / "c").rglob("*") if p.is_file())


def test_version_3_stores_checksum_every_array_and_write_every_chunk(dit_run):
    path, _ = dit_run
    root = zarr.open_group(str(path), mode="r")
    names = _arrays_on_disk(path)
    assert {"timesteps", "step_index", "seed", "label", "done", "token_index", "images"} <= set(names)
    assert {"stats/resid_l01/count", "stats/resid_l01/sum", "stats/resid_l01/sumsq"} <= set(names)
    assert root.attrs["format_version"] == FORMAT_VERSION == 3
    for name in names:
        arr = root[name]
        assert isinstance(arr.metadata.codecs[-1], Crc32cCodec), name
        grid = [-(-n // c) for n, c in zip(arr.shape, arr.chunks, strict=True)]
        # The store is finished: every chunk of the grid is a file, including the all-fill ones (zarr
        # leaves those out by default), e.g. sample 0's seed and label, which are 0.
        assert len(_chunk_files(path, name)) == int(np.prod(grid)), name


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_damage_to_any_array_is_named_by_verify_and_by_every_read(dit_run, tmp_path, damage):
    from tide.store.reader import read_array
    from tide.store.verify import verify

    path = Path(shutil.copytree(dit_run[0], tmp_path / "s.zarr"))
    assert verify(path).problems == []
    for name in _arrays_on_disk(path):
        for file in {_chunk_files(path, name)[0], _chunk_files(path, name)[-1]}:
            saved = file.read_bytes()
            file.unlink() if damage == "delete" else _flip(file)
            problems = verify(path).problems
            assert any(str(file) in p for p in problems), (name, problems)
            quick = verify(path, check_values=False).problems
            assert damage == "flip" or any(str(file) in p for p in quick), (name, quick)
            with pytest.raises(ChunkError, match=str(file)) as e:  # what every command reads through
                read_array(zarr.open_group(str(path), mode="r")[name])
            assert ("is missing" if damage == "delete" else "checksum") in str(e.value)
            file.write_bytes(saved)
    assert verify(path).problems == []


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error: " in result.output, result.output
    msg = result.output[result.output.index("error: ") :]
    assert msg.count("\n") == 1, result.output
    return msg


def test_a_lost_timesteps_chunk_stops_train_and_eval_instead_of_t_0(dit_run, tmp_path):
    path = Path(shutil.copytree(dit_run[0], tmp_path / "s.zarr"))
    (path / "timesteps/c/0").unlink()
    result = runner.invoke(app, ["store", "verify", str(path)])
    assert (
        result.exit_code == 1
        and f"timesteps: chunk file {path / 'timesteps/c/0'} (steps 0..2) is missing" in result.output
    )
    train_args = ["train", "--store", str(path), "--out", str(tmp_path / "saes"), "--layers", "1", "--arch",
                  "topk", "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "16", "--no-progress"]  # fmt: skip
    for args in (train_args, ["eval", str(dit_run[1]), "--store", str(path)]):
        msg = _one_line_error(runner.invoke(app, args))
        assert f"timesteps: chunk file {path / 'timesteps/c/0'}" in msg and "restore the file" in msg, msg
    result = runner.invoke(
        app, ["store", "verify", str(path), "--reset-damaged"]
    )  # no harvest writes it again
    assert result.exit_code == 1 and "timesteps cannot be written again by tide" in result.output, (
        result.output
    )
    assert "marked samples" not in result.output and "--reset-damaged` and then" not in result.output
    _flip(path / "step_index/c/0")
    result = runner.invoke(app, ["store", "verify", str(path)])
    assert (
        result.exit_code == 1
        and "step_index: chunk file" in result.output
        and "fails its checksum" in result.output
    )


@pytest.mark.parametrize("name", ["label", "token_index", "images"])
def test_features_refuses_a_lost_chunk_instead_of_fill_values(dit_run, tmp_path, name):
    path = Path(shutil.copytree(dit_run[0], tmp_path / "s.zarr"))
    lost = _chunk_files(path, name)[1]
    lost.unlink()
    args = ["features", str(dit_run[1]), "--store", str(path), "--out", str(tmp_path / "rep"), "--split",
            "all", "--max-pages", "2", "--images", "2", "--no-progress"]  # fmt: skip
    msg = _one_line_error(runner.invoke(app, args))
    assert f"{name}: chunk file {lost} (samples 2..3" in msg and "is missing" in msg, msg
    assert "--reset-damaged" in msg


def test_a_damaged_stats_chunk_is_named_and_stats_write_repairs_it(dit_run, tmp_path):
    path = Path(shutil.copytree(dit_run[0], tmp_path / "s.zarr"))
    before = {
        s: zarr.open_array(str(path / f"stats/resid_l01/{s}"), mode="r")[:] for s in ("count", "sum", "sumsq")
    }
    damaged = path / "stats/resid_l01/sum/c/1/0/0"
    _flip(damaged)
    result = runner.invoke(app, ["store", "verify", str(path)])
    assert result.exit_code == 1 and f"stats/resid_l01/sum: chunk file {damaged}" in result.output, (
        result.output
    )
    assert "disagree" not in result.output
    msg = _one_line_error(runner.invoke(app, ["store", "stats", str(path)]))
    assert str(damaged) in msg and f"tide store stats {path} --write" in msg, msg
    (path / "stats/resid_l01/count/c/2/0").unlink()
    result = runner.invoke(app, ["store", "stats", str(path), "--write"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "rewrote the stored sums" in result.output and "2 damaged" in result.output, result.output
    assert runner.invoke(app, ["store", "verify", str(path)]).exit_code == 0
    for stat, values in before.items():
        np.testing.assert_allclose(
            zarr.open_array(str(path / f"stats/resid_l01/{stat}"), mode="r")[:], values, rtol=1e-12
        )


def test_reset_damaged_then_harvest_mends_a_lost_done_chunk(tiny_dit, dit_run, tmp_path):
    from tide.harvest.run import harvest

    path = Path(shutil.copytree(dit_run[0], tmp_path / "s.zarr"))
    (path / "done/c/1").unlink()
    result = runner.invoke(app, ["store", "verify", str(path), "--reset-damaged"])
    assert result.exit_code == 1 and "done: chunk file" in result.output, result.output
    assert "marked samples 2..3 not done" in result.output, result.output
    assert harvest(harvest_config(tiny_dit, path, **DIT_RUN), log=lambda m: None).written == 2
    result = runner.invoke(app, ["store", "verify", str(path)])
    assert result.exit_code == 0 and "incomplete" not in result.output, result.output
