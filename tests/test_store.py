"""Store format: index arithmetic, info and verify."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from tide.cli import app
from tide.store.schema import Layout, choose_chunks, token_subset
from typer.testing import CliRunner

from tests.factories import harvested

runner = CliRunner()


@given(
    n=st.integers(1, 40),
    s=st.integers(1, 60),
    t=st.integers(1, 300),
    d=st.sampled_from([8, 64, 1152, 4096]),
    b=st.integers(1, 64),
    itemsize=st.sampled_from([2, 4]),
)
@settings(max_examples=200, deadline=None)
def test_chunks_tile_the_array_exactly_once(n, s, t, d, b, itemsize):
    spc, tpc = choose_chunks(b, s, t, d, itemsize)
    lay = Layout(
        num_samples=n,
        num_steps=s,
        tokens=t,
        d_model=d,
        batch_size=b,
        steps_per_chunk=spc,
        tokens_per_chunk=tpc,
    )
    cover = np.zeros((n, s, t), dtype=np.int32)
    for chunk in lay.chunks():
        sel = lay.chunk_selection(chunk)
        cover[sel[:3]] += 1
        assert lay.chunk_rows(chunk) == cover[sel[:3]].size
    assert (cover == 1).all()
    assert t % tpc == 0  # a write of all tokens always covers whole chunks
    assert spc * b * tpc * d * itemsize <= 64 << 20 or spc == 1  # a few MB, unless one step alone is bigger


def test_token_subset_is_sorted_unique_and_seeded():
    a = token_subset(7, 3, 256, 16)
    assert len(set(a)) == 16 and (np.diff(a) > 0).all() and a.max() < 256
    np.testing.assert_array_equal(a, token_subset(7, 3, 256, 16))
    assert not np.array_equal(a, token_subset(7, 4, 256, 16))
    np.testing.assert_array_equal(token_subset(7, 3, 10, 10), np.arange(10))


@pytest.fixture()
def small_store(tiny_dit, tmp_path):
    return harvested(
        tiny_dit, tmp_path / "s.zarr", num_samples=4, num_steps=3, layers="0,2", token_fraction=0.5
    )


def test_info_reports_the_store(small_store):
    result = runner.invoke(app, ["store", "info", str(small_store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (
        info["samples_done"] == "4 / 4" and info["layers"] == [0, 2] and info["rows_per_array"] == 4 * 3 * 8
    )
    assert info["bytes_on_disk"] > 0 and info["compression_ratio"] > 0.5


def test_verify_passes_a_sound_store(small_store):
    result = runner.invoke(app, ["store", "verify", str(small_store)])
    assert result.exit_code == 0 and "ok" in result.output


def test_verify_names_a_nan(small_store):
    arr = zarr.open_array(str(small_store / "resid_l02"), mode="r+")
    block = arr[2:4]
    block[1, 2, 3, 4] = np.nan
    arr[2:4] = block
    result = runner.invoke(app, ["store", "verify", str(small_store)])
    assert result.exit_code == 1
    assert "resid_l02: non-finite value at sample 3, step 2" in result.output
    assert "stats/resid_l02 disagree" in result.output


def test_verify_names_a_missing_array_and_bad_metadata(small_store):
    shutil.rmtree(small_store / "resid_l00")
    result = runner.invoke(app, ["store", "verify", str(small_store)])
    assert result.exit_code == 1 and "array resid_l00 is missing" in result.output
    meta = json.loads((small_store / "zarr.json").read_text())
    meta["attributes"]["num_samples"] = "many"
    (small_store / "zarr.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["store", "verify", str(small_store)])
    assert result.exit_code == 1 and "invalid tide metadata" in result.output


def test_info_on_a_non_store_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["store", "info", str(tmp_path)])
    assert result.exit_code == 2 and "not a Zarr v3 store" in result.output
