"""Sharing a store (issue 10): pack into a zip that tide, zarr and xarray open; the dataset card; the
xarray view with its coordinates."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import zarr
from tide.cli import app
from tide.store.reader import open_store
from typer.testing import CliRunner

from tests.factories import random_store, synthetic_store, trained

runner = CliRunner()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("share") / "s.zarr"
    random_store(folder)
    return folder


def test_pack_verify_train_and_open_with_xarray(small, tmp_path):
    xr = pytest.importorskip("xarray")
    packed = tmp_path / "s.zarr.zip"
    result = runner.invoke(app, ["store", "pack", str(small), "--out", str(packed)])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(packed) as z:
        infos = z.infolist()
    assert "zarr.json" in {i.filename for i in infos}
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)

    ok = runner.invoke(app, ["store", "verify", str(packed)])
    assert ok.exit_code == 0 and "is a sound tide store" in ok.output, ok.output

    cfg = dict(
        archs=("tide", "topk"), k=(4,), batch_size=32, max_steps=3, val_fraction=0.25, window_rows=128,
        device="cpu",
    )  # fmt: skip
    from safetensors.numpy import load_file

    zipped, folder = trained(packed, tmp_path / "zip", **cfg), trained(small, tmp_path / "dir", **cfg)
    for p, q in zip(zipped, folder, strict=True):
        wa, wb = load_file(p / "sae.safetensors"), load_file(q / "sae.safetensors")
        for k in wa:
            np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)

    ds = xr.open_zarr(zarr.storage.ZipStore(packed, mode="r"), consolidated=False)
    np.testing.assert_array_equal(ds["resid_l00"].values, open_store(small).root["resid_l00"][:])


def test_pack_refuses_an_existing_file_and_a_name_without_zip(small, tmp_path):
    (tmp_path / "taken.zip").write_bytes(b"x")
    taken = runner.invoke(app, ["store", "pack", str(small), "--out", str(tmp_path / "taken.zip")])
    assert taken.exit_code != 0 and "already exists" in taken.output
    plain = runner.invoke(app, ["store", "pack", str(small), "--out", str(tmp_path / "s.zarr2")])
    assert plain.exit_code != 0 and "ends in .zip" in plain.output


def test_card_and_xarray_coordinates(small, tmp_path):
    xr = pytest.importorskip("xarray")
    yaml = pytest.importorskip("yaml")
    result = runner.invoke(app, ["store", "card", str(small)])
    assert result.exit_code == 0, result.output
    text = (small / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert set(front["tags"]) == {"tide", "sparse-autoencoders", "diffusion-transformer", "zarr"}
    assert "license" in front and "synthetic" in text and "set_xindex" in text
    # The card is tide's own: verify and --overwrite's check still see a tide store and nothing foreign.
    from tide.store.outputs import tide_files

    assert tide_files(small, "store")[1] == []

    ds = xr.open_zarr(small, consolidated=False)
    assert {"timesteps", "step_index", "seed", "label", "done"} <= set(ds["resid_l00"].coords)
    assert list(ds.data_vars) == ["resid_l00"]
    t = float(ds.timesteps[2])
    one = ds.set_xindex("timesteps").sel(timesteps=t)["resid_l00"]
    np.testing.assert_array_equal(one.values, open_store(small).root["resid_l00"][:, 2])
    labels = open_store(small).root["label"][:]
    threes = ds.set_xindex("label").sel(label=int(labels[0]))["resid_l00"]
    np.testing.assert_array_equal(threes.values, open_store(small).root["resid_l00"][:][labels == labels[0]])


def test_card_to_a_file_outside_the_store(tmp_path):
    # A hub dataset repository shows only its root README.md: the card goes beside the store's folder.
    store = tmp_path / "repo" / "h.zarr"
    synthetic_store(store, num_samples=4, num_steps=2, tokens=2, d_model=4, batch_size=2)
    result = runner.invoke(app, ["store", "card", str(store), "--out", str(tmp_path / "repo" / "README.md")])
    assert result.exit_code == 0, result.output
    from tide.store.card import card_text

    assert (tmp_path / "repo" / "README.md").read_text() == card_text(open_store(store))
    assert not (store / "README.md").exists()
