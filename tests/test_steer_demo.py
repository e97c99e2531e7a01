"""`make steer-demo` (train/loop/steer_demo.py): attribute steering on a small demo-model store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tide.train.analysis.attributes import ATTRIBUTES, as_array, attributes
from tide.train.fit.data import Split

from tests.factories import random_sae, tiny_store, write_sae


def test_correlations_match_numpy_within_and_across_classes():
    from tide.train.loop.steer_pick import correlations

    rng = np.random.default_rng(0)
    act_NF, attr_NA = rng.random((40, 7)), rng.random((40, 3))
    act_NF[:, 2] = 0  # a latent that never fires: r 0, not NaN
    class_N = rng.integers(0, 4, 40)
    got = correlations(act_NF, attr_NA, None)
    within = correlations(act_NF, attr_NA, class_N)

    def minus_class_means(x):
        return x - np.stack([x[class_N == c].mean(0) for c in class_N])

    x, y = minus_class_means(act_NF), minus_class_means(attr_NA)
    for a in range(3):
        for f in (0, 1, 3, 4, 5, 6):
            assert got[a, f] == pytest.approx(np.corrcoef(attr_NA[:, a], act_NF[:, f])[0, 1])
            assert within[a, f] == pytest.approx(np.corrcoef(y[:, a], x[:, f])[0, 1])
        assert got[a, 2] == 0 and within[a, 2] == 0
    # one sample per class leaves nothing to correlate within a class: refused, not an arbitrary latent
    from tide.train.loop.steer_pick import pick_latents

    with pytest.raises(ValueError, match="give more --probe-samples"):
        pick_latents(act_NF[:4], act_NF[:4] > 0, np.ones(7), rng.random((4, 6)), np.arange(4))


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """12 demo-model samples of classes 3 and 5 (3 chunks of 4), 4 steps, final images saved; a random tide
    SAE on layer 1 that trained on chunks 0 and 1 and holds out chunk 2."""
    from tide.harvest.config import HarvestConfig
    from tide.harvest.run import harvest

    root = tmp_path_factory.mktemp("demo")
    cfg = HarvestConfig(
        out=root / "s.zarr", num_samples=12, num_steps=4, batch_size=4, layers="1", token_fraction=0.25,
        labels="3,5", dtype="float32", save_images=True, progress=False,
    )  # fmt: skip
    harvest(cfg, log=lambda m: None)
    split = Split(val_fraction=0.3, split_seed=0, train_chunks=[0, 1], val_chunks=[2])
    sae = random_sae(128, cfg.out, "resid_l01")
    write_sae(root / "saes" / "tide", cfg.out, "resid_l01", sae, split)
    return root


def _mean_activations(sae, x_NSTD: np.ndarray, t_S: np.ndarray) -> np.ndarray:
    """(N, F) each sample's activation averaged over its steps and tokens, one (sample, step) at a time."""
    N, S = x_NSTD.shape[:2]
    out = [
        [sae.forward_raw(torch.as_tensor(x_NSTD[i, k]), float(t_S[k])).z_BF.numpy() for k in range(S)]
        for i in range(N)
    ]
    return np.stack([np.mean(rows, axis=(0, 1)) for rows in out])


def _run(root, out, **kw):
    from tide.train.loop.steer_demo import AttributeDemoConfig, run_demo

    cfg = AttributeDemoConfig(saes=root / "saes", out=out, batch_size=3, device="cpu", progress=False, **kw)
    return run_demo(cfg, log=lambda m: None)


def test_strength_zero_reproduces_the_unsteered_images_bitwise(demo_store, tmp_path):
    from tide.store.reader import open_store

    r = _run(
        demo_store, tmp_path / "o", multiples=(0.0,), down=(), off=False, probe_samples=8, candidates=1,
        screen_samples=3,
    )  # fmt: skip
    assert r["pick"] == "push-pull"  # the default: signed regions, where x - 0 * d must be x bit for bit too
    store = open_store(demo_store / "s.zarr")
    stored = store.root["images"][8:12]  # the held-out chunk's final images, as the harvest drew them
    assert r["held_out_samples"] == [8, 9, 10, 11]
    for name in ATTRIBUTES:
        folder = tmp_path / "o" / name
        np.testing.assert_array_equal(np.load(folder / "unsteered.npy"), stored)
        np.testing.assert_array_equal(np.load(folder / "images.npy"), stored)  # strength 0: bit for bit
        np.testing.assert_array_equal(np.load(folder / "labels.npy"), store.root["label"][8:12])
        assert (folder / "direction.txt").read_text().strip() in ("+1", "-1") and (
            folder / "grid.png"
        ).is_file()
    for a in r["attributes"]:
        (e,) = a["edits"]
        assert (e["edit"], e["change_sd"], e["class_kept"], e["digit_like"]) == ("up 0x", 0.0, 1.0, 1.0)


def test_picks_and_figures_agree_with_the_saved_images(demo_store, tmp_path):
    """Each attribute's latent is the best within-class predictor on the training samples' own stored images,
    and the printed figures are the ones the saved images give (plain recomputation, shipped classifier)."""
    from tide.harvest.demo_model import DIGITS_MAX, fit_classifier, to_digits_BF
    from tide.store.reader import open_store
    from tide.train.fit.checkpoint import load_sae
    from tide.train.loop.steer_demo import format_table

    r = _run(
        demo_store, tmp_path / "o", multiples=(1.0, 40.0), down=(), off=True, probe_samples=8,
        pick="correlation",
    )  # fmt: skip
    store = open_store(demo_store / "s.zarr")
    s = load_sae(demo_store / "saes" / "tide")
    # the per-sample mean activation over every stored row, by a plain loop over samples and steps
    x = store.root["resid_l01"][:8].astype(np.float32)  # (8, S, T, D)
    with torch.no_grad():
        act = _mean_activations(s.sae, x, store.timesteps)

    attr = as_array(attributes(store.root["images"][:8]))
    labels = store.root["label"][:8]
    for a, pick in enumerate(r["attributes"]):
        y = attr[:, a] - np.array([attr[labels == c, a].mean() for c in labels])
        z = act - np.stack([act[labels == c].mean(0) for c in labels])
        with np.errstate(invalid="ignore", divide="ignore"):
            r_F = np.nan_to_num(
                [np.corrcoef(y, z[:, f])[0, 1] if z[:, f].std() > 0 else 0 for f in range(512)]
            )
        assert abs(pick["r_within"]) == pytest.approx(np.abs(r_F).max(), abs=1e-5)
        assert pick["direction"] == (1 if pick["r_within"] >= 0 else -1)
    clf, _ = fit_classifier()

    def predict(images):
        return clf.predict(
            to_digits_BF(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1).numpy() / DIGITS_MAX
        )

    for a, pick in enumerate(r["attributes"]):
        folder = tmp_path / "o" / pick["attribute"]
        images, base = np.load(folder / "images.npy"), np.load(folder / "unsteered.npy")
        assert not np.array_equal(images, base)  # 40 units of a latent change the images
        a0, a1 = as_array(attributes(base))[:, a], as_array(attributes(images))[:, a]
        top = next(e for e in pick["edits"] if e["edit"] == "up 40x")
        assert top["change_sd"] == pytest.approx(np.nanmean(a1 - a0) / np.nanstd(a0, ddof=1))
        assert top["class_kept"] == pytest.approx(np.mean(predict(images) == predict(base)))
        assert [e["edit"] for e in pick["edits"]] == ["up 1x", "up 40x", "off"]
    table = format_table(r)
    assert all(f"{name}: latent" in table for name in ATTRIBUTES) and "up 40x" in table


def test_demo_refuses_a_model_that_does_not_draw_digits(tiny_dit, tmp_path):
    from tide.train.loop.steer_demo import AttributeDemoConfig, run_demo

    store = tiny_store(tiny_dit, tmp_path / "s.zarr")
    split = Split(val_fraction=0.5, split_seed=0, train_chunks=[0], val_chunks=[1])
    write_sae(tmp_path / "saes" / "tide", store, "resid_l01", random_sae(16, store, "resid_l01"), split)
    with pytest.raises(ValueError, match="is not a digits model"):
        run_demo(
            AttributeDemoConfig(saes=tmp_path / "saes", out=tmp_path / "o", device="cpu", progress=False)
        )
    assert not (tmp_path / "o").exists()


def test_pick_by_effect_picks_the_latent_whose_steering_moves_the_attribute_most(demo_store, tmp_path):
    """--pick effect: each candidate redrawn alone with `tide steer`'s edit (one latent, every row) changes the
    screened training samples' attributes by the figures the screen reports; each attribute's pick is the
    candidate with the largest |change| among those keeping class and digit-likeness on >= 80% of them (the
    largest of all when none does), declared in the direction of its change; candidates are each attribute's
    best within-class predictors."""
    from tide.harvest.demo_model import DIGITS_MAX, fit_classifier, to_digits_BF
    from tide.store.reader import open_store
    from tide.train.fit.checkpoint import load_sae
    from tide.train.loop.rerun import Intervention, rerun
    from tide.train.loop.steer import add_edit
    from tide.train.loop.steer_classes import digit_distance
    from tide.train.loop.steer_demo import format_table

    r = _run(
        demo_store, tmp_path / "o", multiples=(40.0,), off=False, probe_samples=8, pick="effect",
        candidates=2, screen_samples=3,
    )  # fmt: skip
    sc, store = r["screen"], open_store(demo_store / "s.zarr")
    assert (sc["samples"], sc["multiple"], r["pick"]) == (3, 40.0, "effect")
    s = load_sae(demo_store / "saes" / "tide")
    probe0 = store.root["images"][:8]  # the probe samples (training chunks 0 and 1), as the harvest drew them
    sd = np.nanstd(as_array(attributes(probe0)), axis=0, ddof=1)
    base, a0 = probe0[:3], as_array(attributes(probe0[:3]))
    clf, _ = fit_classifier()

    def predict(images):
        x = to_digits_BF(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1).numpy() / DIGITS_MAX
        return clf.predict(x)

    run, limit = rerun(store.meta, device="cpu"), digit_distance(base).max()
    ok, size = {}, {}
    for cand in sc["candidates"]:
        f = cand["latent"]
        edit = add_edit(s.sae, f, 40.0 * cand["unit"])
        imgs = run.sample(np.arange(3), [Intervention("resid", 1, edit)]).images.numpy()
        change = np.nanmean(as_array(attributes(imgs)) - a0, axis=0) / sd
        np.testing.assert_allclose([cand["change_sd"][n] for n in ATTRIBUTES], change, atol=1e-9)
        kept, like = np.mean(predict(imgs) == predict(base)), np.mean(digit_distance(imgs) <= limit)
        assert (cand["class_kept"], cand["digit_like"]) == pytest.approx((kept, like))
        ok[f], size[f] = kept >= 0.8 and like >= 0.8, np.abs(change)
    chosen = [f for f in size if ok[f]] or list(size)
    for a, pick in enumerate(r["attributes"]):
        assert pick["latent"] == max(chosen, key=lambda f: size[f][a])
        screened = next(c for c in sc["candidates"] if c["latent"] == pick["latent"])["change_sd"]
        assert pick["screened"] == screened[pick["attribute"]]
        assert pick["direction"] == (1 if pick["screened"] >= 0 else -1)
    # candidates: the union of each attribute's 2 best within-class predictors on the probe samples
    with torch.no_grad():
        act = _mean_activations(s.sae, store.root["resid_l01"][:8].astype(np.float32), store.timesteps)
    labels, attr = store.root["label"][:8], as_array(attributes(probe0))
    z = act - np.stack([act[labels == c].mean(0) for c in labels])
    best = set()
    for a in range(len(ATTRIBUTES)):
        y = attr[:, a] - np.array([attr[labels == c, a].mean() for c in labels])
        r_F = [abs(np.corrcoef(y, z[:, f])[0, 1]) if z[:, f].std() > 1e-7 else 0 for f in range(z.shape[1])]
        best |= set(np.argsort(r_F, kind="stable")[::-1][:2].tolist())
    assert [c["latent"] for c in sc["candidates"]] == sorted(best)
    assert "picked by effect" in format_table(r) and "screened change" in format_table(r)


@pytest.mark.parametrize("pick", ["region", "push-pull"])
def test_pick_region_steers_the_ink_latent_on_each_attributes_region(demo_store, tmp_path, pick):
    """--pick region: one latent for all six attributes, the screened candidate (of every attribute's best
    within-class predictors) that moves ink most while keeping class and digit-likeness; each attribute's images are the
    held-out samples redrawn with a plain edit adding 40 units of its direction on the tokens of the
    attribute's region, masked by hand; the direction is the ink change's sign times the region's.
    --pick push-pull: the same, and the edit subtracted on every other token (ink's region is all of them)."""
    from tide.store.reader import open_store
    from tide.train.fit.checkpoint import load_sae
    from tide.train.loop.rerun import Intervention, rerun
    from tide.train.loop.steer import direction
    from tide.train.loop.steer_demo import format_table

    r = _run(
        demo_store, tmp_path / "o", multiples=(40.0,), off=False, probe_samples=8, pick=pick,
        candidates=1, screen_samples=3,
    )  # fmt: skip
    sc, store = r["screen"], open_store(demo_store / "s.zarr")
    cands = sc["candidates"]
    ok = [c for c in cands if c["class_kept"] >= 0.8 and c["digit_like"] >= 0.8] or cands
    best = max(ok, key=lambda c: abs(c["change_sd"]["ink"]))
    ink_sign = 1 if best["change_sd"]["ink"] >= 0 else -1
    assert {a["latent"] for a in r["attributes"]} == {best["latent"]}
    s, run = load_sae(demo_store / "saes" / "tide"), rerun(store.meta, device="cpu")
    rows, cols = np.divmod(np.arange(64), 8)  # the demo model's 8 x 8 grid of image tokens (16 px, patch 2)
    masks = {
        "ink": np.ones(64, bool), "width": (cols >= 2) & (cols < 6), "height": (rows >= 2) & (rows < 6),
        "center_x": cols < 4, "center_y": rows < 4, "slant": (rows < 4) != (cols < 4),
    }  # fmt: skip
    signs = {"ink": 1, "width": -1, "height": -1, "center_x": -1, "center_y": -1, "slant": -1}
    for a in r["attributes"]:
        name, f = a["attribute"], a["latent"]
        assert a["direction"] == ink_sign * signs[name]
        mask_N = torch.as_tensor(masks[name], dtype=torch.float32)
        if pick == "push-pull":
            mask_N = mask_N - torch.as_tensor(~masks[name], dtype=torch.float32)  # -1 off the region

        def plain(site, layer, step, t, x_RND, f=f, mask_N=mask_N):
            return x_RND + 40.0 * best["unit"] * mask_N[:, None] * direction(s.sae, f, t)

        want = run.sample(np.arange(8, 12), [Intervention("resid", 1, plain)]).images.numpy()
        np.testing.assert_array_equal(np.load(tmp_path / "o" / name / "images.npy"), want, err_msg=name)
    # candidates: each attribute's best within-class predictor on the probe samples (their union)
    with torch.no_grad():
        act = _mean_activations(s.sae, store.root["resid_l01"][:8].astype(np.float32), store.timesteps)
    labels, attr = store.root["label"][:8], as_array(attributes(store.root["images"][:8]))
    z = act - np.stack([act[labels == c].mean(0) for c in labels])
    best_F = set()
    for a in range(len(ATTRIBUTES)):
        y = attr[:, a] - np.array([attr[labels == c, a].mean() for c in labels])
        r_F = [abs(np.corrcoef(y, z[:, f])[0, 1]) if z[:, f].std() > 1e-7 else 0 for f in range(z.shape[1])]
        best_F.add(int(np.argsort(r_F, kind="stable")[::-1][0]))
    assert [c["latent"] for c in cands] == sorted(best_F)
    region = "antidiagonal" if pick == "region" else "antidiagonal/diagonal"
    assert f"picked by {pick}" in format_table(r) and f"region {region}\n" in format_table(r)
