"""tide splice on tiny DiT pipelines: an exact SAE equals clean, ablations do not, bad inputs are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tide.cli import app
from tide.train.loop.splice import SpliceConfig, mean_edit, splice
from tide.train.loop.splice_report import format_report
from typer.testing import CliRunner

from tests.conftest import save_tiny_dit
from tests.factories import harvested, identity_sae, random_sae, tiny_store, write_sae


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dit):
    root = tmp_path_factory.mktemp("splice")
    store = tiny_store(tiny_dit, root / "s.zarr")
    exact = write_sae(root / "saes" / "exact", store, "resid_l01", identity_sae(16))
    rand = write_sae(root / "saes" / "random", store, "resid_l01", random_sae(16, store, "resid_l01"))
    other_model = save_tiny_dit(root / "other-dit", seed=1)
    other = write_sae(
        root / "other" / "mlp", tiny_store(other_model, root / "o.zarr"), "mlp_l01", identity_sae(16)
    )
    return {"root": root, "exact": exact, "random": rand, "other": other}


def test_exact_sae_equals_clean_and_ablations_do_not(setup, tmp_path):
    cfg = SpliceConfig(
        saes=(setup["exact"], setup["random"]), out=tmp_path / "o", num_samples=3, buckets=2, progress=False
    )
    r = splice(cfg, log=lambda m: None).report
    clean = np.load(tmp_path / "o" / "clean" / "images.npy")
    assert clean.shape == (3, 8, 8, 1) and clean.dtype == np.uint8
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "exact" / "images.npy"), clean)
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "clean" / "labels.npy"), [0, 1, 2])
    c = r["conditions"]
    assert c["exact"]["output_rel_error"] < 1e-6 and c["exact"]["image_mse"] == 0
    assert c["zero_ablation"]["image_mse"] > 0 and c["mean_ablation"]["output_rel_error"] > 1e-3
    assert not np.array_equal(np.load(tmp_path / "o" / "zero_ablation" / "images.npy"), clean)
    assert len(c["random"]["output_rel_error_per_step"]) == 4 and c["random"]["output_rel_error"] > 1e-3
    fr = r["saes"]["exact"]["fidelity_recovered"]["zero_ablation"]
    assert fr["output"] == pytest.approx(1, abs=1e-6) and fr["image"] == 1
    assert [b["steps"] for b in r["buckets"]] == [[0, 2], [2, 4]]
    assert r["buckets"][1]["conditions"]["exact"]["image_mse"] == 0
    assert (tmp_path / "o" / "grid.png").is_file()
    assert json.loads((tmp_path / "o" / "report.json").read_text())["num_samples"] == 3
    assert "fidelity recovered" in format_report(r)


def test_splice_only_inside_steps(setup, tmp_path):
    cfg = SpliceConfig(saes=(setup["random"],), out=tmp_path / "o", num_samples=2, steps="2:4", buckets=0)
    per_step = splice(cfg, log=lambda m: None).report["conditions"]["random"]["output_rel_error_per_step"]
    assert per_step[:2] == [0, 0] and min(per_step[2:]) > 0


def test_mean_ablation_uses_the_nearest_stored_timestep():
    mean_SD = np.arange(6, dtype=np.float32).reshape(3, 2)
    edit = mean_edit(mean_SD, np.array([999.0, 500.0, 10.0]))
    import torch

    x = torch.zeros(1, 4, 2)
    assert edit("resid", 0, 0, 480.0, x)[0, 3].tolist() == [2, 3]
    assert edit("resid", 0, 0, 0.0, x)[0, 0].tolist() == [4, 5]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "2:9"], "--steps 2:9 is out of range: the run has 4 steps"),
        (["--layer", "0"], "was trained on resid at layer 1, but it would be put into resid at layer 0"),
        (["--site", "mlp"], "was trained on resid at layer 1, but it would be put into mlp at layer 1"),
    ],
)
def test_bad_inputs_give_one_clear_error(setup, tmp_path, args, message):
    out = str(tmp_path / "o")
    res = CliRunner().invoke(app, ["splice", str(setup["exact"]), "--out", out, "--num-samples", "1", *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output


def test_sae_of_another_model_is_refused_naming_both(setup, tmp_path):
    args = [
        "splice",
        str(setup["exact"]),
        str(setup["other"]),
        "--out",
        str(tmp_path / "o"),
        "--num-samples",
        "1",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "mlp was trained on another model's activations: the pipeline" in text and "other-dit" in text


def test_pixart_exact_sae_equals_clean(tiny_pixart, tmp_path):
    store = harvested(
        tiny_pixart, tmp_path / "p.zarr", num_samples=2, num_steps=3, layers="1",
        prompts=tiny_pixart / "prompts.txt", prompt_embeds=tiny_pixart / "embeds.safetensors",
        guidance_scale=3.0, token_fraction=1.0, dtype="float32",
    )  # fmt: skip
    exact = write_sae(tmp_path / "saes" / "exact", store, "resid_l01", identity_sae(16))
    r = splice(SpliceConfig(saes=(exact,), out=tmp_path / "o", num_samples=3, buckets=0), log=lambda m: None)
    c = r.report["conditions"]
    assert (
        c["exact"]["image_mse"] == 0
        and c["exact"]["accuracy"] is None
        and c["zero_ablation"]["image_mse"] > 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "clean" / "labels.npy"), [0, 1, 2])  # prompt index


def test_grid_places_each_image_names_each_row_and_says_which_samples(tmp_path):
    from PIL import Image, ImageDraw, ImageFont
    from tide.train.loop.splice_report import grid_caption, save_grid

    rng = np.random.default_rng(0)
    rows = [
        (name, rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)) for name in ("clean", "resid_l03-tide")
    ]
    save_grid(tmp_path / "g.png", rows, cols=3)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    pad, size = 4, 64  # 8-pixel images are drawn 8x, 4 pixels apart
    font = ImageFont.load_default()
    label_w = pad + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength("resid_l03-tide", font))
    head = 2 * pad + int(font.getbbox(grid_caption(3, 5))[3])
    assert grid.shape[0] == head + 2 * (size + pad) + pad
    assert (grid[pad : head - pad] < 128).any(), "no caption above the rows"
    for i, (_, images) in enumerate(rows):
        top = head + pad + i * (size + pad)
        assert (grid[top : top + size, pad:label_w] < 128).any(), f"row {i} has no name"
        for j, img in enumerate(images[:3]):
            left = label_w + pad + j * (size + pad)
            expected = np.kron(img[..., 0], np.ones((8, 8), dtype=np.uint8))
            np.testing.assert_array_equal(grid[top : top + size, left : left + size, 0], expected)
    assert grid_caption(3, 5).startswith("the first 3 of 5 samples")
    assert grid_caption(8, 8).startswith("all 8 samples")


def test_cli_progress_counts_image_steps_and_ends_with_the_table(setup, tmp_path):
    """The bar counts samples x conditions x denoising steps (it moves every step, not every batch), and the
    command ends with the report's table, each condition on a labelled row."""
    import json
    import re

    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["splice", str(setup["exact"]), "--out", str(out), "--num-samples", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    conditions, steps = report["conditions"], report["num_steps"]
    runs = len(conditions) + sum(
        len(b["conditions"]) for b in report["buckets"]
    )  # whole run, then per bucket
    counts = [(int(a), int(b)) for a, b in re.findall(r"\b(\d+)/(\d+) \[", res.output)]
    assert counts and counts[-1] == (2 * runs * steps,) * 2, counts
    table = res.output.split(" [")[-1].splitlines()
    assert all(any(line.split() and line.split()[0] == name for line in table) for name in conditions), table
