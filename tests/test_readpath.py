"""The read path (issue 20): checksums verified on every read from mapped chunk files, a loader whose read
threads follow the machine, and the GPU path's pinned buffers."""

from __future__ import annotations

import numpy as np
import pytest
from tide.store.reader import ChunkError, chunk_values, read_into
from tide.train.fit.data import ActivationLoader

from tests.factories import synthetic_store


@pytest.fixture
def raw_store(tmp_path):
    return synthetic_store(
        tmp_path / "s.zarr", num_samples=8, num_steps=4, tokens=4, d_model=16, batch_size=4,
        steps_per_chunk=2, codec="none", values="random",
    )  # fmt: skip


def test_a_chunk_damaged_in_place_after_a_good_read_is_refused(raw_store):
    """A chunk file stays mapped between reads (store.reader._KeptMaps), and its mapping is the file's own
    pages: bytes changed in place (no rename) after a read that passed are checked again, on read_into and
    in the loader."""
    arr = raw_store.array("resid_l00")
    whole = (slice(4, 8), slice(2, 4), slice(0, 4), slice(None))
    first = np.empty((4, 2, 4, 16), arr.dtype)
    read_into(arr, whole, first)
    np.testing.assert_array_equal(first, arr[whole])  # zarr's own pipeline is the reference
    file = raw_store.path / "resid_l00" / "c" / "1" / "1" / "0" / "0"
    with open(file, "r+b") as f:  # in place, as a failing disk would: same inode, same size
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ChunkError, match=f"{file}.*fails its checksum"):
        read_into(arr, whole, first)
    loader = ActivationLoader(raw_store, ["resid_l00"], [0, 1], 8)
    with pytest.raises(ChunkError, match=str(file)):
        list(loader.batches(epochs=1))


def test_a_kept_mapping_follows_its_file_renamed_over_or_cut_short(raw_store):
    """The second read of a chunk uses the mapping the first one kept; a file renamed over the chunk's (how
    zarr writes) is read anew, and one cut short is refused naming it, never read past its end."""
    arr = raw_store.array("resid_l00")
    assert raw_store.array("resid_l00") is arr  # the Store keeps its arrays, and with them their mappings
    region = (slice(4, 8), slice(2, 4), slice(0, 4), slice(None))
    other = (slice(0, 4), slice(0, 2), slice(0, 4), slice(None))
    expected, replacement = arr[region], arr[other]  # zarr's own pipeline is the reference
    out = np.empty_like(expected)
    folder = raw_store.path / "resid_l00" / "c"
    file = folder / "1" / "1" / "0" / "0"
    read_into(arr, region, out)
    kept = arr._tide_kept_maps.maps[str(file)]
    read_into(arr, region, out)
    assert arr._tide_kept_maps.maps[str(file)] is kept  # not mapped anew
    np.testing.assert_array_equal(out, expected)
    new = file.with_name("new")
    new.write_bytes((folder / "0" / "0" / "0" / "0").read_bytes())
    new.replace(file)  # a new inode at the same path, as zarr writes a chunk
    read_into(arr, region, out)
    np.testing.assert_array_equal(out, replacement)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # the same inode, shorter
    with pytest.raises(ChunkError, match=f"{file}"):
        read_into(arr, region, out)


def test_an_uncompressed_chunk_is_its_mapped_bytes_and_cut_reads_agree(raw_store):
    """chunk_values hands out a read-only view of the file's bytes (nothing copied) for a whole chunk and for
    a part of one, equal to zarr's read; a compressed chunk lands in the scratch buffer."""
    arr = raw_store.array("resid_l00")
    for selection in [
        (slice(0, 4), slice(0, 2), slice(0, 4), slice(None)),
        (slice(1, 3), slice(1, 2), slice(2, 4), slice(None)),
    ]:
        shape = tuple(s.stop - s.start for s in selection[:3]) + (16,)
        scratch = np.full(shape, np.nan, arr.dtype)
        with chunk_values(arr, selection, scratch) as values:
            assert values is not scratch and not values.flags.writeable
            np.testing.assert_array_equal(values, arr[selection])
        assert np.isnan(scratch).all()  # never touched
    packed = synthetic_store(
        raw_store.path.parent / "z.zarr", num_samples=8, num_steps=4, tokens=4, d_model=16, batch_size=4,
        steps_per_chunk=2, codec="blosc-zstd", values="random",
    )  # fmt: skip
    arr = packed.array("resid_l00")
    selection = (slice(0, 4), slice(0, 2), slice(0, 4), slice(None))
    scratch = np.empty((4, 2, 4, 16), arr.dtype)
    with chunk_values(arr, selection, scratch) as values:
        assert values is scratch
    np.testing.assert_array_equal(scratch, arr[selection])


def test_the_loader_reads_with_one_thread_per_core_it_may_use(raw_store, monkeypatch):
    import os

    from tide.train.fit.config import TrainConfig

    assert TrainConfig.model_fields["read_threads"].default is None  # tide train follows the machine too
    every = os.sched_getaffinity(0)
    assert ActivationLoader(raw_store, ["resid_l00"], [0, 1], 8).read_threads == len(every)
    try:
        os.sched_setaffinity(0, {min(every)})  # as taskset or a job scheduler narrows it
        loader = ActivationLoader(raw_store, ["resid_l00"], [0, 1], 8)
        assert loader.read_threads == 1
        assert sum(len(b.t_B) for b in loader.batches(epochs=1)) == 8 * 4 * 4
    finally:
        os.sched_setaffinity(0, every)
    assert ActivationLoader(raw_store, ["resid_l00"], [0, 1], 8, read_threads=3).read_threads == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks on this machine share its cores
    assert ActivationLoader(raw_store, ["resid_l00"], [0, 1], 8).read_threads == max(1, len(every) // 2)
