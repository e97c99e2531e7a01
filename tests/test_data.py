"""The activation loader (train/fit/data.py), the train/validation split, and store statistics (store/stats.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from tide.cli import app
from tide.store.reader import StoreError, open_store
from tide.store.stats import difference, recompute_sums, stored_sums
from tide.train.fit.data import ActivationLoader, Position, split_samples
from typer.testing import CliRunner

from tests.factories import harvested, random_store, synthetic_store

runner = CliRunner()


@pytest.fixture(scope="module")
def index_store(tmp_path_factory):
    """12 samples in 4 sample chunks x 3 step chunks x 2 token chunks; rows hold their own (i, s, t)."""
    return synthetic_store(
        tmp_path_factory.mktemp("idx") / "s.zarr", num_samples=12, num_steps=5, tokens=4, batch_size=3,
        layers=(0, 1), steps_per_chunk=2, tokens_per_chunk=2,
    )  # fmt: skip


def _rows(batches) -> list[tuple[int, int, int]]:
    """(sample, step, token) of every row, as its values say, checked against the batch's own indices."""
    out = []
    for b in batches:
        x = b.x_ABD.float()
        assert (
            x.shape[0] == 2 and (x[1, :, :3] == x[0, :, :3]).all() and (x[1, :, 3] == 1).all()
        )  # arrays aligned
        assert (x[0, :, 0].long() == b.sample_B).all() and (x[0, :, 1].long() == b.step_B).all()
        out += [tuple(r) for r in x[0, :, :3].long().tolist()]
    return out


def _loader(store, chunks, **kw) -> ActivationLoader:
    kw = {"batch_size": 7, "window_rows": 30, "drop_last": False, **kw}
    return ActivationLoader(store, ["resid_l00", "resid_l01"], chunks, **kw)


def test_every_train_row_once_per_epoch_and_no_held_out_sample(index_store):
    split = split_samples(index_store.layout, index_store.done_chunks(), 0.25, split_seed=3)
    assert len(split.val_chunks) == 1 and sorted(split.train_chunks + split.val_chunks) == [0, 1, 2, 3]
    loader = _loader(index_store, split.train_chunks)
    held = {i for a, b in split.val_samples(index_store.layout) for i in range(a, b)}
    want = {(i, s, t) for i in range(12) if i not in held for s in range(5) for t in range(4)}
    for epoch in range(2):
        batches = list(loader.batches(Position(epoch, 0), epochs=1))
        rows = _rows(batches)
        assert Counter(rows) == Counter(want)  # each exactly once
        assert [len(b.t_B) for b in batches] == [7] * (len(want) // 7) + [len(want) % 7]
        t_S = torch.as_tensor(index_store.timesteps, dtype=torch.float32)
        assert all(torch.equal(b.t_B, t_S[b.step_B]) for b in batches)


def test_order_is_seeded_and_batches_mix_chunks(index_store):
    chunks = [0, 1, 2, 3]
    a = _rows(_loader(index_store, chunks, seed=1, window_rows=60).batches(epochs=2))
    assert a == _rows(_loader(index_store, chunks, seed=1, window_rows=60).batches(epochs=2))
    assert a != _rows(_loader(index_store, chunks, seed=2, window_rows=60).batches(epochs=2))
    assert a[:240] != a[240:]  # epochs differ
    lay = index_store.layout
    mixed = [
        len(
            {
                (i // lay.batch_size, s // lay.steps_per_chunk, t // lay.tokens_per_chunk)
                for i, s, t in a[j : j + 7]
            }
        )
        for j in range(0, 240 - 7, 7)
    ]
    assert min(mixed) >= 2 and np.mean(mixed) > 3


def test_resume_from_a_position_continues_the_same_stream(index_store):
    loader = _loader(index_store, [0, 1, 2, 3], drop_last=True)
    full = list(loader.batches(epochs=3))
    for cut in (1, 5, 33, 34, 50):
        rest = list(loader.batches(full[cut - 1].position, epochs=3 - full[cut - 1].position.epoch))
        assert _rows(rest) == _rows(full[cut:]), cut


@pytest.mark.parametrize("stratify", [False, True])
def test_rank_shares_split_every_batch_of_one_process(index_store, stratify):
    """N ranks (torchrun): each reads its own chunks of every window, the ranks' chunks are disjoint and
    together the window's, and their shares of batch j are one process's batch j, split (from a resume
    position too)."""
    kw = {"seed": 3, "stratify_steps": stratify, "drop_last": True}
    one = _loader(index_store, [0, 1, 2, 3], **kw)
    start = Position(1, 14)
    whole = list(one.batches(start, epochs=2))
    for ranks in (2, 3):
        loaders = [_loader(index_store, [0, 1, 2, 3], rank=r, ranks=ranks, **kw) for r in range(ranks)]
        for w in one.plan(1):
            dealt = [loader._own(w)[0].reads for loader in loaders]
            assert sorted(r.chunk for reads in dealt for r in reads) == sorted(r.chunk for r in w.reads)
            sizes = [sum(r.rows for r in reads) for reads in dealt]
            assert max(sizes) - min(sizes) <= max(r.rows for r in w.reads)  # dealt evenly, to a chunk
        shares = [list(loader.batches(start, epochs=2)) for loader in loaders]
        assert [len(s) for s in shares] == [len(whole)] * ranks
        for j, batch in enumerate(whole):
            parts = [s[j] for s in shares]
            assert all(p.position == batch.position and p.global_rows == 7 for p in parts)
            assert Counter(_rows(parts)) == Counter(_rows([batch])), (ranks, j)
            reads = [{(i // 3, s // 2, t // 2) for i, s, t in _rows([p])} for p in parts]
            assert all(not a & b for a in reads for b in reads if a is not b)  # chunks read by one rank


def test_step_range_filter(index_store):
    rows = _rows(_loader(index_store, [0, 2], step_range=(1, 4)).batches(epochs=1))
    assert Counter(rows) == Counter(
        (i, s, t) for i in [0, 1, 2, 6, 7, 8] for s in (1, 2, 3) for t in range(4)
    )


def test_stratified_batches_hold_every_step_evenly(tmp_path):
    store = synthetic_store(
        tmp_path / "s.zarr", num_samples=20, num_steps=10, tokens=8, batch_size=4, steps_per_chunk=5,
        tokens_per_chunk=8,
    )  # fmt: skip
    loader = ActivationLoader(
        store,
        ["resid_l00"],
        list(range(5)),
        batch_size=50,
        window_rows=640,
        stratify_steps=True,
        drop_last=True,
    )
    for b in loader.batches(epochs=1):
        counts = np.bincount(b.step_B.numpy(), minlength=10)
        assert counts.min() >= 5 - 2 and counts.max() <= 5 + 2, counts
    rows = Counter(_rows_1(loader.batches(epochs=1)))
    assert len(rows) == 20 * 10 * 8 - (20 * 10 * 8) % 50 and max(rows.values()) == 1


def _rows_1(batches):
    return [tuple(r) for b in batches for r in b.x_ABD[0, :, :3].float().long().tolist()]


def test_split_is_seeded_and_stable_as_the_store_grows():
    from tide.store.schema import Layout

    lay = Layout(
        num_samples=100,
        num_steps=2,
        tokens=1,
        d_model=4,
        batch_size=10,
        steps_per_chunk=1,
        tokens_per_chunk=1,
    )
    full = split_samples(lay, list(range(10)), 0.2, 0)
    assert len(full.val_chunks) == 2 and full == split_samples(lay, list(range(10)), 0.2, 0)
    assert full.val_chunks != split_samples(lay, list(range(10)), 0.2, 1).val_chunks
    part = split_samples(lay, list(range(6)), 0.2, 0)
    assert set(part.val_chunks) == set(full.val_chunks) & set(range(6))
    with pytest.raises(ValueError, match="no sample chunk is left to train on"):
        split_samples(lay, full.val_chunks, 0.2, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loader_reads_float32_and_bfloat16_stores(tmp_path, dtype):
    store = synthetic_store(tmp_path / "s.zarr", dtype=dtype, layers=(0, 1))
    b = next(iter(_loader(store, [0, 1, 2, 3]).batches()))
    assert b.x_ABD.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    assert _rows([b])


def test_zarr_and_numpy_sources_give_identical_batches(index_store):
    source = [index_store.root[n][:] for n in ("resid_l00", "resid_l01")]
    a = list(_loader(index_store, [0, 1, 3]).batches(epochs=1))
    b = list(_loader(index_store, [0, 1, 3], source=source).batches(epochs=1))
    assert all(torch.equal(x.x_ABD, y.x_ABD) and x.position == y.position for x, y in zip(a, b, strict=True))


# --- statistics ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_store(tiny_dit, tmp_path_factory):
    path = harvested(
        tiny_dit, tmp_path_factory.mktemp("dit") / "s.zarr", num_samples=5, num_steps=4, layers="0,2",
        token_fraction=0.5, guidance_scale=1.0,
    )  # fmt: skip
    return open_store(path)


def test_dask_recomputes_the_writers_sums(dit_store):
    for name in dit_store.meta.act_names():
        sums = recompute_sums(dit_store, name)
        assert sums.chunks == [0, 1, 2]
        stored = stored_sums(dit_store, name, sums.chunks)
        np.testing.assert_array_equal(sums.count, stored.count)
        np.testing.assert_allclose(sums.sum, stored.sum, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sums.sumsq, stored.sumsq, rtol=1e-12, atol=1e-12)
        assert difference(sums, stored) < 1e-12


def test_store_stats_cli_checks_and_rewrites_the_sums(dit_store, tmp_path):
    import shutil

    import zarr

    path = tmp_path / "copy.zarr"
    shutil.copytree(dit_store.path, path)
    result = runner.invoke(app, ["store", "stats", str(path), "--array", "resid_l02"])
    assert result.exit_code == 0, result.output
    assert "stored sums match" in result.output and "rms norm" in result.output
    zarr.open_array(str(path / "stats/resid_l02/sum"), mode="r+")[1, 2, 3] += 5.0
    result = runner.invoke(app, ["store", "stats", str(path), "--array", "resid_l02"])
    assert result.exit_code == 2 and "disagree" in result.output and "--write" in result.output
    assert runner.invoke(app, ["store", "stats", str(path), "--array", "resid_l02", "--write"]).exit_code == 0
    assert runner.invoke(app, ["store", "stats", str(path)]).exit_code == 0


def test_store_stats_errors_name_the_fix(dit_store):
    result = runner.invoke(app, ["store", "stats", str(dit_store.path), "--array", "resid_l01"])
    assert result.exit_code == 2 and "resid_l00, resid_l02" in result.output
    try:
        import distributed  # noqa: F401
    except ImportError:
        with pytest.raises(StoreError, match="pip install distributed"):
            recompute_sums(dit_store, "resid_l00", scheduler="tcp://127.0.0.1:8786")


@pytest.mark.parametrize("codec", ["blosc-zstd", "zstd", "none"])
def test_direct_chunk_decoding_equals_zarr(tmp_path, codec):
    from tide.store.reader import ChunkError, _direct_codec, read_into

    store = random_store(
        tmp_path / "s.zarr", num_samples=7, num_steps=5, tokens=4, d_model=8, batch_size=3, steps_per_chunk=2,
        tokens_per_chunk=2, codec=codec,
    )  # fmt: skip
    arr, lay = store.array("resid_l00"), store.layout
    assert _direct_codec(arr) is not False  # the fast path is the one under test
    lost = (1, 1, 1)
    (tmp_path / "s.zarr/resid_l00/c/1/1/1/0").unlink()  # a missing chunk is an error on both paths
    reads = lay.chunk_reads([0, 1, 2], (1, 5))
    assert any(r.selection[0].stop - r.selection[0].start == 1 for r in reads)  # the edge sample chunk
    for r in reads:
        shape = tuple(s.stop - s.start for s in r.selection[:3]) + (lay.d_model,)
        fast, slow = np.full(shape, np.nan, np.float16), np.full(shape, np.nan, np.float16)
        if r.chunk == lost:
            for direct in (True, False):
                with pytest.raises(ChunkError, match="resid_l00/c/1/1/1/0 .* is missing"):
                    read_into(arr, r.selection, fast, direct=direct)
            continue
        read_into(arr, r.selection, fast)
        read_into(arr, r.selection, slow, direct=False)
        np.testing.assert_array_equal(fast, slow, err_msg=str(r.chunk))


def test_window_arrays_are_reused_only_when_no_batch_holds_them(index_store):
    """Streamed batches (dropped at once, so window arrays are recycled) equal batches all kept at once, and
    a batch kept while the loader goes on keeps its values."""
    loader = _loader(index_store, [0, 1, 2, 3], window_rows=20)
    kept = list(loader.batches(epochs=3))
    frozen = [b.x_ABD.clone() for b in kept]
    streamed, held = [], None
    for b in loader.batches(epochs=3):
        streamed.append(b.x_ABD.clone())
        held = held if held is not None else b  # the first batch stays referenced throughout
    assert len(loader._recycled) <= 4 + loader.prefetch  # arrays were reused, not one per window
    assert len(streamed) == len(kept) > 3 * len(loader.plan(0))
    assert all(torch.equal(a, b) for a, b in zip(streamed, frozen, strict=True))
    assert all(torch.equal(a.x_ABD, b) for a, b in zip(kept, frozen, strict=True))
    assert torch.equal(held.x_ABD, frozen[0])
