"""tide steer on tiny DiT pipelines and the demo model: no-op edits are exact, real ones change images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tide.cli import app
from tide.train.fit.checkpoint import load_sae
from tide.train.loop.steer import SteerConfig, add_edit, clamp_edit, direction, steer
from typer.testing import CliRunner

from tests.factories import harvested, random_sae, tiny_store, write_sae

DEAD = 5  # a latent whose encoder bias keeps it off everywhere


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_dit):
    root = tmp_path_factory.mktemp("steer")
    store = tiny_store(tiny_dit, root / "s.zarr")
    sae = random_sae(16, store, "resid_l01")
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e6
    return write_sae(root / "saes" / "tide", store, "resid_l01", sae)


def _run(sae_dir, out, **kw):
    cfg = SteerConfig(sae=sae_dir, out=out, num_samples=3, progress=False, **kw)
    return steer(cfg, log=lambda m: None)


def test_strength_zero_and_own_value_clamp_are_clean(sae_dir, tmp_path):
    r = _run(sae_dir, tmp_path / "a", latent=3, strength=0.0)
    np.testing.assert_array_equal(r.images, r.unsteered)
    r = _run(sae_dir, tmp_path / "b", latent=DEAD, clamp=0.0)  # 0 is the dead latent's own value
    np.testing.assert_array_equal(r.images, r.unsteered)
    r = _run(sae_dir, tmp_path / "c", latent=DEAD, clamp=50.0, rows="cond", steps="0:2")
    assert not np.array_equal(r.images, r.unsteered)
    r = _run(sae_dir, tmp_path / "d", latent=3, strength=20.0, labels="2")
    assert not np.array_equal(r.images, r.unsteered)
    np.testing.assert_array_equal(np.load(tmp_path / "d" / "labels.npy"), [2, 2, 2])
    np.testing.assert_array_equal(np.load(tmp_path / "d" / "seeds.npy"), [0, 1, 2])
    assert (
        np.load(tmp_path / "d" / "images.npy").shape == (3, 8, 8, 1)
        and (tmp_path / "d" / "grid.png").is_file()
    )


def test_edits_against_plain_maths(sae_dir):
    s = load_sae(sae_dir).sae
    x_BND = torch.randn(2, 5, 16) * 3
    t = float(s.input_mean_t[1])
    # the raw direction is the decoder row times the input scale
    torch.testing.assert_close(direction(s, 3, t), s.W_dec[3].detach() * s.input_scale)
    got = add_edit(s, 3, torch.tensor([1.0, 2.0]))("resid", 1, 0, t, x_BND)
    torch.testing.assert_close(got, x_BND + torch.tensor([1.0, 2.0])[:, None, None] * direction(s, 3, t))
    # clamping: x + s * (z' - z) @ W_dec, only latent F moved
    out = s.forward_raw(x_BND.reshape(10, 16), t)
    z = out.z_BF.clone()
    z[:, 7] = 4.0
    want = x_BND.reshape(10, 16) + (z - out.z_BF) @ s.W_dec.detach() * s.input_scale
    torch.testing.assert_close(clamp_edit(s, 7, 4.0)("resid", 1, 0, t, x_BND).reshape(10, 16), want)
    own = out.z_BF[:, 7].clone()
    assert torch.equal(clamp_edit(s, 7, 0.0)("resid", 1, 0, t, x_BND), x_BND) == bool((own == 0).all())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--latent", "64", "--strength", "1"], "--latent 64 is out of range: tide has 64 latents (0..63)"),
        (
            ["--latent", "1", "--strength", "1", "--clamp", "2"],
            "--strength 1.0 and --clamp 2.0 were both given",
        ),
        (["--latent", "1"], "give --strength A"),
        (
            ["--latent", "1", "--strength", "1", "--steps", "3:7"],
            "--steps 3:7 is out of range: the run has 4 steps",
        ),
        (["--latent", "1", "--strength", "1", "--region", "middle"], "--region 'middle' is not a region"),
        (["--latent", "1", "--strength", "1", "--region", "left/top"], "left and top share tokens"),
    ],
)
def test_bad_inputs_give_one_clear_error(sae_dir, tmp_path, args, message):
    cmd = ["steer", str(sae_dir), "--out", str(tmp_path / "o"), "--num-samples", "1", *args]
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_the_old_sae_flag_still_works_with_a_note(sae_dir, tmp_path):
    args = ["--latent", "64", "--strength", "1", "--out", str(tmp_path / "o")]
    new = CliRunner().invoke(app, ["steer", str(sae_dir), *args])
    old = CliRunner().invoke(app, ["steer", "--sae", str(sae_dir), *args])
    assert old.exit_code == new.exit_code == 2
    assert "--sae is deprecated" in old.output and "--sae" not in new.output
    assert old.output.splitlines()[-1] == new.output.splitlines()[-1]  # the same run, the same error
    neither = CliRunner().invoke(app, ["steer", *args])
    assert neither.exit_code == 2 and "missing the SAE folder" in neither.output


def test_demo_rows_edit_is_add_edit_per_sample(sae_dir):
    from tide.train.loop.steer_classes import rows_edit

    s = load_sae(sae_dir).sae
    t = float(s.input_mean_t[0])
    x_RND = torch.randn(4, 3, 16)  # 2 samples, cond rows then uncond rows
    got = rows_edit(s, [3, 9], [1.5, -2.0])("resid", 1, 0, t, x_RND)
    for b, (f, a) in enumerate([(3, 1.5), (9, -2.0)]):
        want = add_edit(s, f, a)("resid", 1, 0, t, x_RND[[b, b + 2]])
        torch.testing.assert_close(got[[b, b + 2]], want)


def test_digit_distance_real_digits_near_noise_far():
    from sklearn.datasets import load_digits
    from tide.train.loop.steer_classes import digit_distance

    real = load_digits().images[:5] / 16 * 255  # (5, 8, 8)
    up = np.repeat(np.repeat(real, 2, 1), 2, 2).round().astype(np.uint8)[..., None]  # (5, 16, 16, 1)
    noise = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    near, far = digit_distance(up), digit_distance(noise)
    assert near.max() < 0.2 and far.min() > 10 * near.max() + 5


def test_demo_replay_writes_back_what_recorder_saw():
    from tide.train.loop.steer_classes import recorder, replay

    seen: dict[int, torch.Tensor] = {}
    x0, x1 = torch.randn(4, 3, 16), torch.randn(4, 3, 16)
    assert recorder(seen)("resid", 1, 0, 999.0, x0) is x0  # recording changes nothing
    recorder(seen)("resid", 1, 1, 979.0, x1)
    x0.add_(1)  # the stored copy is not the live tensor
    other = torch.zeros(4, 3, 16)
    torch.testing.assert_close(replay(seen)("resid", 1, 1, 979.0, other), x1)
    torch.testing.assert_close(replay(seen)("resid", 1, 0, 999.0, other), x0 - 1)


def test_demo_class_means_and_mean_difference_edit(sae_dir):
    from tide.store.reader import open_store
    from tide.train.loop.steer_classes import class_means, mean_difference_edit

    store = open_store(load_sae(sae_dir).meta.store.path)
    array = load_sae(sae_dir).meta.array
    x_NSTD = store.root[array][:].astype(np.float64)
    labels = store.root["label"][:]
    got = class_means(store, array)
    for c in np.unique(labels):
        want_SD = x_NSTD[labels == c].mean(axis=(0, 2))
        np.testing.assert_allclose(got[:, c].numpy(), want_SD, rtol=1e-5, atol=1e-6)
    t_S = store.timesteps
    x_RND = torch.randn(4, 3, got.shape[-1])  # 2 samples, cond rows then uncond rows
    out = mean_difference_edit(got, t_S, [0, 1], [1, 0], 2.0)("resid", 1, 0, float(t_S[-1]) + 0.4, x_RND)
    d_D = 2.0 * (got[-1, 1] - got[-1, 0])
    for row, sign in [(0, 1), (1, -1), (2, 1), (3, -1)]:
        torch.testing.assert_close(out[row], x_RND[row] + sign * d_D)


def test_demo_sweep_end_to_end_on_the_demo_model(tmp_path):
    """`make steer-demo`'s sweep on a 10-sample, 4-step demo store with a random tide SAE: the files and their
    layout, strength 0 leaves every image as unsteered, and the figures agree with the saved images."""
    from tide.harvest.config import DEMO_MODEL, HarvestConfig
    from tide.harvest.demo_model import DIGITS_MAX, fit_classifier, to_digits_BF
    from tide.train.loop.steer_classes import digit_distance, sweep

    assert HarvestConfig().model == str(DEMO_MODEL)  # the model `make steer-demo` harvests
    store = harvested(
        DEMO_MODEL, tmp_path / "s.zarr", num_samples=10, num_steps=4, batch_size=10, layers="1",
        token_fraction=1.0, dtype="float32",
    )  # fmt: skip
    write_sae(tmp_path / "saes" / "tide", store, "resid_l01", random_sae(128, store, "resid_l01"))
    r = sweep(
        tmp_path / "saes",
        tmp_path / "o",
        10,
        "cpu",
        False,
        per_target=1,
        multiples=(0.0,),
        log=lambda m: None,
    )
    src, tgt = np.load(tmp_path / "o" / "labels.npy"), np.load(tmp_path / "o" / "target.npy")
    np.testing.assert_array_equal(tgt, np.arange(10))
    np.testing.assert_array_equal(src, (np.arange(10) + 1) % 10)
    images = np.load(tmp_path / "o" / "images.npy")
    assert images.shape == (10, 16, 16, 1) and images.dtype == np.uint8
    clf, _ = fit_classifier()
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    pred = clf.predict(to_digits_BF(x).numpy() / DIGITS_MAX)
    assert r["unsteered_accuracy"] == pytest.approx(float((pred == src).mean()))  # strength 0: unsteered
    limit = digit_distance(images).max()
    assert r["success_by_multiple"][0.0] == pytest.approx(
        float(((pred == tgt) & (digit_distance(images) <= limit)).mean())
    )
    assert set(r["class_mean_difference"]) == {1.0, 4.0} and 0 <= r["ceiling"]["success"] <= 1
    assert (
        r["ceiling"]["target_run_accuracy"] >= 0
        and r["ceiling"]["still_source"] + r["ceiling"]["classifier_only"] <= 1
    )


def test_cli_ends_with_a_labelled_table_and_counts_image_steps(sae_dir, tmp_path):
    """`tide steer` prints its summary as labelled lines (not JSON) that agree with steer.json, and its
    progress bar counts image-steps: 2 runs (unsteered, steered) x samples x denoising steps."""
    import json
    import re

    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app,
        ["steer", str(sae_dir), "--latent", "3", "--strength", "5", "--num-samples", "3", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "steer.json").read_text())
    assert f"SAE {sae_dir.name}, latent 3, strength 5, steps all, rows both" in res.output
    assert f"3 samples x {summary['num_steps']} steps; {summary['pixels_changed']:.1%}" in res.output
    assert not any(line.startswith("{") for line in res.output.splitlines())
    counts = [(int(a), int(b)) for a, b in re.findall(r"\b(\d+)/(\d+) \[", res.output)]
    assert counts and counts[-1] == (2 * 3 * summary["num_steps"],) * 2, counts


def test_table_of_a_digits_summary_labels_each_row():
    """The classifier part: accuracy and class counts under labelled rows, as in the summary."""
    from tide.train.loop.steer import format_summary

    summary = {
        "sae": "tide", "latent": 7, "strength": None, "clamp": 0.0, "steps": "10:20", "rows": "cond",
        "num_samples": 4, "num_steps": 50, "pixels_changed": 0.25, "predicted": [1, 0, 3] + [0] * 7,
        "predicted_unsteered": [4] + [0] * 9, "unsteered_accuracy": 1.0, "steered_accuracy": 0.25,
    }  # fmt: skip
    lines = format_summary(summary).splitlines()
    assert lines[0] == "SAE tide, latent 7, clamp 0, steps 10:20, rows cond"
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert rows["unsteered"] == ["1.00", "4"] + ["0"] * 9
    assert rows["steered"] == ["0.25", "1", "0", "3"] + ["0"] * 7


def test_region_masks_on_a_hand_drawn_grid():
    """Token n of a 4 x 4 grid sits at row n // 4, column n % 4 (diffusers' PatchEmbed flattens row by row)."""
    from tide.train.loop.regions import REGIONS, region_mask

    rows, cols = np.divmod(np.arange(16), 4)
    want = {
        "all": np.ones(16, bool), "left": cols < 2, "right": cols >= 2, "top": rows < 2, "bottom": rows >= 2,
        "inner-cols": (cols == 1) | (cols == 2), "outer-cols": (cols == 0) | (cols == 3),
        "inner-rows": (rows == 1) | (rows == 2), "outer-rows": (rows == 0) | (rows == 3),
        "diagonal": (rows < 2) == (cols < 2), "antidiagonal": (rows < 2) != (cols < 2),
    }  # fmt: skip
    assert set(want) == set(REGIONS)
    for name, mask in want.items():
        np.testing.assert_array_equal(region_mask(name, 16).numpy(), mask, err_msg=name)
    with pytest.raises(ValueError, match="needs a square grid of image tokens, and this site has 12"):
        region_mask("left", 12)


def test_signed_regions_are_plus_on_the_first_and_minus_on_the_second():
    from tide.train.loop.regions import COMPLEMENT, check_region, region_weights

    rows, cols = np.divmod(np.arange(64), 8)
    left, inner = (cols < 4).astype(np.float32), ((rows >= 2) & (rows < 6)).astype(np.float32)
    np.testing.assert_array_equal(region_weights("left/right", 64).numpy(), 2 * left - 1)
    np.testing.assert_array_equal(region_weights("outer-rows/inner-rows", 64).numpy(), 1 - 2 * inner)
    np.testing.assert_array_equal(region_weights("top", 64).numpy(), (rows < 4).astype(np.float32))
    for a, b in COMPLEMENT.items():  # a region and its complement cover the grid, once each
        np.testing.assert_array_equal(region_weights(f"{a}/{b}", 64).abs().numpy(), np.ones(64), err_msg=a)
    with pytest.raises(ValueError, match="'left/top': left and top share tokens"):
        check_region("left/top")
    with pytest.raises(ValueError, match="'left/middle' is not a region tide knows"):
        check_region("left/middle")


@pytest.mark.parametrize("region", ["left", "left/right"])
def test_region_steering_is_a_plain_hook_adding_the_direction_on_those_tokens(
    sae_dir, tiny_dit, tmp_path, region
):
    """tide steer --region left: the images of harvest's sampler with a plain forward hook on the SAE's block
    that adds A x (decoder row x input scale) to the tokens of the left half of the grid, in both CFG rows;
    --region left/right: the same, and subtracts it from the tokens of the right half."""
    from tide.harvest.capture import Conditioning
    from tide.harvest.model import load_model
    from tide.harvest.sampler import generate, to_images
    from tide.store.reader import open_store

    r = _run(sae_dir, tmp_path / "o", latent=3, strength=20.0, region=region)
    s = load_sae(sae_dir)
    meta = open_store(s.meta.store.path).meta
    model = load_model(str(tiny_dit))
    d_D = (s.sae.W_dec[3] * s.sae.input_scale).detach()

    def hook(module, args, out_RND):
        side = int(round(out_RND.shape[1] ** 0.5))
        left_N = torch.as_tensor(np.arange(out_RND.shape[1]) % side < side / 2, dtype=out_RND.dtype)
        if region == "left":
            return out_RND + 20.0 * left_N[:, None] * d_D
        return out_RND + 20.0 * (2 * left_N - 1)[:, None] * d_D

    model.transformer.transformer_blocks[1].register_forward_hook(hook)
    cond = Conditioning(class_labels=torch.as_tensor(r.labels))
    want = to_images(model, generate(model, cond, [0, 1, 2], meta.num_inference_steps, meta.guidance_scale))
    np.testing.assert_array_equal(r.images, want.numpy())
    assert not np.array_equal(r.images, r.unsteered)
    assert r.summary["region"] == region
