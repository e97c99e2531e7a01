"""Data integrity: a damaged store is an error that names the chunk file, never data a trainer reads silently.

Damage is made by hand on stores written by the real writer: a flipped byte, a truncated or deleted chunk
file. The reference for "what a reader must see" is the store as written (read before the damage).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from store.reader import ChunkError, StoreError, open_store, read_into
from store.schema import FORMAT_VERSION
from tests.bench_train import synthetic_store
from train.data import ActivationLoader

# Chunk (1, 1, 1, 0) of the stores below holds samples 3..5, steps 2..3, tokens 2..3.
KEY = "c/1/1/1/0"


def _store(path: Path, codec: str = "blosc-zstd", num_samples: int = 12):
    return synthetic_store(
        path,
        num_samples=num_samples,
        num_steps=5,
        tokens=4,
        d_model=8,
        batch_size=3,
        steps_per_chunk=2,
        tokens_per_chunk=2,
        codec=codec,
        values="random",
    )


def _flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _as_version_1(path: Path) -> None:
    """Rewrite a store as format version 1 wrote it: no crc32c, all-zero chunks left out (zarr's default)."""
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    for name in open_store(path).meta.act_names():
        old = root[name]
        values, codecs = old[:], list(old.metadata.codecs)
        assert isinstance(codecs[-1], Crc32cCodec)
        new = root.create_array(
            name,
            shape=old.shape,
            dtype=old.dtype,
            chunks=old.chunks,
            fill_value=old.fill_value,
            compressors=codecs[1:-1] or None,
            dimension_names=old.metadata.dimension_names,
            attributes=dict(old.attrs),
            overwrite=True,
        )
        new[:] = values
    root.attrs.update({"format_version": 1})


@pytest.mark.parametrize("codec", ["blosc-zstd", "zstd", "none"])
def test_new_stores_are_version_2_with_a_checksum_and_every_chunk_written(tmp_path, codec):
    store = _store(tmp_path / "s.zarr", codec)
    arr = store.array("resid_l00")
    assert store.meta.format_version == FORMAT_VERSION == 2
    assert isinstance(arr.metadata.codecs[-1], Crc32cCodec)
    # A chunk of zeros (the fill value) is still written: a missing file must always mean a lost one.
    root = zarr.open_group(str(store.path), mode="r+", zarr_format=3)
    from store.writer import StoreWriter

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


def test_a_newer_format_version_is_refused_with_the_fix(tmp_path):
    store = _store(tmp_path / "s.zarr")
    zarr.open_group(str(store.path), mode="r+").attrs.update({"format_version": 3})
    with pytest.raises(StoreError, match="format_version 3.*reads versions 1, 2.*upgrade tide"):
        open_store(store.path)
