"""The feature pass (train/analysis/features.py) against a direct numpy / scikit-learn computation over every row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from tide.train.analysis.features import FeaturesConfig, collect, hist_edges, summarise
from tide.train.fit.checkpoint import load_sae

from tests.factories import random_store, trained


def _store(path, num_samples=40):
    return random_store(path, num_samples=num_samples, num_steps=6)


def _store_and_sae(tmp_path):
    store = _store(tmp_path / "s.zarr")
    (folder,) = trained(
        store.path, tmp_path / "o", layers="0", k=(3,), batch_size=64, max_steps=6, val_fraction=0.25,
        steps="1:6",  # the SAE skips step 0: its rows must not count
    )  # fmt: skip
    return store, load_sae(folder)


def _all_latents(store, loaded):
    """(N, S, T, F) every latent on every row of steps 1..5 (zeros at step 0), by a plain forward_raw."""
    x = torch.as_tensor(store.root["resid_l00"][:].astype(np.float32))
    t = torch.as_tensor(store.timesteps, dtype=torch.float32)[None, :, None].expand(x.shape[:3])
    with torch.no_grad():
        z = loaded.sae.forward_raw(x[:, 1:].reshape(-1, 16), t[:, 1:].reshape(-1)).z_BF.numpy()
    out = np.zeros((*x.shape[:3], z.shape[-1]), dtype=np.float32)
    out[:, 1:] = z.reshape(x.shape[0], x.shape[1] - 1, x.shape[2], -1)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    store, loaded = _store_and_sae(tmp_path_factory.mktemp("features"))
    return store, loaded, _all_latents(store, loaded)


def test_frequencies_top_rows_and_auroc_equal_a_direct_computation(setup):
    store, loaded, z_NSTF = setup
    # Batches of 50 rows straddle sample chunks (4 samples x 5 steps x 8 tokens = 160 rows each).
    cfg = FeaturesConfig(split="all", top_k=6, buckets=2, batch_size=50, progress=False)
    stats = collect(loaded, store, cfg)
    table = summarise(stats, cfg.dense_threshold)
    N, S, T, F = z_NSTF.shape
    assert stats.rows_S.tolist() == [0] + [N * T] * (S - 1)
    np.testing.assert_array_equal(stats.fires_SF, (z_NSTF > 0).sum((0, 2)))
    np.testing.assert_allclose(table.mean_SF[1:], z_NSTF[:, 1:].mean((0, 2)), rtol=1e-5, atol=1e-7)
    assert np.isnan(table.mean_SF[0]).all()
    np.testing.assert_allclose(table.frequency_F, (z_NSTF[:, 1:] > 0).mean((0, 1, 2)))
    # Top rows: the K largest values of each latent, and where they are.
    flat_RF = z_NSTF.reshape(-1, F)
    for f in range(F):
        order = np.argsort(-flat_RF[:, f], kind="stable")[: cfg.top_k]
        np.testing.assert_allclose(stats.top.value_FK[f], flat_RF[order, f], rtol=1e-6)
        where = np.unravel_index(order, (N, S, T))
        distinct = np.diff(flat_RF[order, f]) != 0
        ok = np.concatenate([[True], distinct]) & np.concatenate([distinct, [True]])  # rows not tied
        for got, want in zip(stats.top[1:], where, strict=True):
            np.testing.assert_array_equal(got[f][ok], want[ok])
    # AUROC of each sample's largest activation, overall and per bucket of steps (1-3, 4-5).
    labels = store.root["label"][:]
    assert stats.bucket_steps == [(1, 4), (4, 6)]
    for g, steps in enumerate([slice(1, 6), slice(1, 4), slice(4, 6)]):
        score_NF = z_NSTF[:, steps].max((1, 2))
        for c in range(10):
            want = [roc_auc_score(labels == c, score_NF[:, f]) for f in range(F)]
            np.testing.assert_allclose(table.auroc_GCF[g, c], want, atol=1e-12)
    best = np.nanargmax(table.auroc_GCF[0], axis=0)
    alive = ~table.dead_F
    np.testing.assert_array_equal(table.best_class_F[alive], best[alive])


def test_auroc_from_histograms_equals_sklearn_on_binned_scores(setup):
    """Beyond the exact-score budget the AUROC comes from histograms: it must be exactly scikit-learn's
    AUROC of the scores replaced by their bin."""
    store, loaded, z_NSTF = setup
    cfg = FeaturesConfig(split="all", buckets=1, exact_auroc_bytes=0, progress=False)
    stats = collect(loaded, store, cfg)
    assert stats.scores_NGF is None
    table = summarise(stats, cfg.dense_threshold)
    labels = store.root["label"][:]
    bins_NF = np.searchsorted(hist_edges(), z_NSTF.max((1, 2)), side="left")
    for c in range(10):
        want = [roc_auc_score(labels == c, bins_NF[:, f]) for f in range(bins_NF.shape[1])]
        np.testing.assert_allclose(table.auroc_GCF[0, c], want, atol=1e-12)


def test_val_split_reads_only_held_out_samples(setup):
    store, loaded, z_NSTF = setup
    stats = collect(loaded, store, FeaturesConfig(progress=False))
    val = [i for a, b in loaded.meta.split.val_samples(store.layout) for i in range(a, b)]
    assert sorted(stats.samples) == val
    np.testing.assert_array_equal(stats.fires_SF, (z_NSTF[val] > 0).sum((0, 2)))


def test_memory_does_not_grow_with_the_store(setup, tmp_path):
    """A store 5x larger, with far more rows than the K x F top-K buffers, leaves the accumulators' size as is."""
    _, loaded, _ = setup
    cfg = FeaturesConfig(split="all", top_k=4, batch_size=128, exact_auroc_bytes=0, progress=False)
    small, large = (collect(loaded, _store(tmp_path / f"{n}.zarr", n), cfg) for n in (16, 80))
    assert large.rows_S.sum() > 16 * cfg.top_k * loaded.sae.cfg.num_latents
    assert small.buffer_bytes == large.buffer_bytes > 0
    # The exact-score path holds every sample's scores, so it grows, up to its budget.
    exact = cfg.model_copy(update={"exact_auroc_bytes": 1 << 20})
    assert collect(loaded, _store(tmp_path / "x.zarr", 80), exact).buffer_bytes > large.buffer_bytes


def test_a_store_without_classes_has_no_auroc(setup, monkeypatch):
    import tide.train.analysis.features as features

    store, loaded, z_NSTF = setup
    monkeypatch.setattr(features, "class_names", lambda store: (None, []))
    stats = collect(loaded, store, FeaturesConfig(split="all", progress=False))
    table = summarise(stats, 0.1)
    assert stats.hist_GCFH is None and table.auroc_GCF is None and table.best_class_F is None
    np.testing.assert_array_equal(stats.fires_SF, (z_NSTF > 0).sum((0, 2)))
    records = features.latent_records(stats, table, stats.top.token_FK)
    assert all(r["best_class"] is None and r["best_auroc"] is None for r in records)
