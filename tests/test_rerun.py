"""train/loop/rerun.py, the one way train/ runs a store's model again: it redraws the store's own samples in
any grouping, and refuses another model in one message, whichever command asks (features, splice)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tide.cli import app
from tide.store.reader import open_store
from tide.train.loop.rerun import rerun
from typer.testing import CliRunner

from tests.factories import harvested, trained

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tiny_dit, tmp_path_factory):
    """A store of a copy of the tiny DiT (with its final images) and a topk SAE on its layer 1."""
    work = tmp_path_factory.mktemp("rerun")
    model = shutil.copytree(tiny_dit, work / "model")
    store = harvested(
        model, work / "s.zarr", num_samples=6, num_steps=3, batch_size=4, layers="1", save_images=True
    )
    return work, model, trained(store, work / "saes")[0]


def test_any_samples_in_any_grouping_are_the_harvests(made):
    work, _, _ = made
    store = open_store(work / "s.zarr")
    run = rerun(store.meta)
    saved = store.root["images"][:]
    assert run.meta.num_samples == 6 and np.array_equal(run.arrays["seeds"], store.root["seed"][:])
    np.testing.assert_array_equal(run.images([5, 0, 3], batch_size=2), saved[[5, 0, 3]])
    np.testing.assert_array_equal(run.sample(slice(1, 3)).images.numpy(), saved[1:3])
    np.testing.assert_array_equal(run.labels(), store.root["label"][:])


def test_other_weights_are_refused_in_one_message_by_every_command(made, tmp_path):
    work, model, sae = made
    other = shutil.copytree(model, tmp_path / "other")
    from diffusers import DiTTransformer2DModel

    t = DiTTransformer2DModel.from_pretrained(other / "transformer")
    with torch.no_grad():
        t.transformer_blocks[0].norm1.linear.weight[0, 0] += 1e-3
    t.save_pretrained(other / "transformer")
    with pytest.raises(ValueError) as e:
        rerun(open_store(work / "s.zarr").meta, model=other)
    want = str(e.value)
    assert f"{other} holds other weights" in want and "pass --model with the pipeline folder" in want

    no_images = shutil.copytree(work / "s.zarr", tmp_path / "noimages.zarr")
    shutil.rmtree(no_images / "images")
    features = [
        "features",
        str(sae),
        "--store",
        str(no_images),
        "--out",
        str(tmp_path / "f"),
        "--model",
        str(other),
    ]
    splice = ["splice", str(sae), "--out", str(tmp_path / "sp"), "--num-samples", "1", "--model", str(other)]
    for args in (features, splice):
        result = runner.invoke(app, [*args, "--no-progress"])
        assert result.exit_code == 2, result.output
        assert " ".join(want.split()) in " ".join(result.output.split()), (args[0], result.output)


def test_a_model_that_cannot_be_loaded_is_named(made, tmp_path):
    work, _, _ = made
    with pytest.raises(
        ValueError, match=f"cannot load the store's model {tmp_path / 'gone'}: .*pass --model"
    ):
        rerun(open_store(work / "s.zarr").meta, model=tmp_path / "gone")
