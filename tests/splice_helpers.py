"""Tiny stores and SAE folders for the splice and steer tests, written with tide's own writers."""

from __future__ import annotations

from pathlib import Path

import torch
from tide.harvest.config import HarvestConfig
from tide.harvest.run import harvest
from tide.store.reader import open_store
from tide.train.fit.checkpoint import SAEMeta, StoreRef, save_sae
from tide.train.fit.data import Split
from tide.train.sae.model import SAEConfig, build_sae

NUM_STEPS = 4


def tiny_store(model: Path, out: Path) -> Path:
    cfg = HarvestConfig(
        model=str(model), out=out, num_samples=4, num_steps=NUM_STEPS, batch_size=2, layers="1",
        sites="resid,mlp", token_fraction=1.0, guidance_scale=2.0, dtype="float32", progress=False,
    )  # fmt: skip
    harvest(cfg, log=lambda m: None)
    return out


def write_sae(folder: Path, store_path: Path, array: str, sae, split: Split | None = None) -> Path:
    """An SAE folder for `sae` on the store's `array`; by default trained on chunks 0 and 1, none held out."""
    store = open_store(store_path)
    meta = SAEMeta(
        name=folder.name, array=array, sae=sae.cfg, store=StoreRef(path=str(store_path), identity=store.identity()),
        split=split or Split(val_fraction=0, split_seed=0, train_chunks=[0, 1], val_chunks=[]), step_range=(0, NUM_STEPS),
        normalization="test", input_scale=float(sae.input_scale), trained_steps=0, trained_rows=0, train_config={},
    )  # fmt: skip
    save_sae(folder, sae, meta)
    return folder


def identity_sae(d: int):
    """A real topk SAE that returns its input exactly: latents [relu(x), relu(-x)], decoder [I; -I]."""
    sae = build_sae(SAEConfig(arch="topk", d_model=d, num_latents=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(d: int, store_path: Path, array: str, arch: str = "tide", seed: int = 0):
    """A random SAE with the store's per-step input normalisation, as `tide train` sets it."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch=arch, d_model=d, num_latents=4 * d, k=4))
    store = open_store(store_path)
    stats = store.stats(array)
    sae.set_input_normalization(
        torch.as_tensor(stats.mean, dtype=torch.float32),
        float(stats.mean_sq_norm.mean() ** 0.5 / d**0.5),
        torch.as_tensor(store.timesteps, dtype=torch.float32),
    )
    if sae.modulation is not None:
        with torch.no_grad():
            for p in sae.modulation.parameters():
                p.normal_(0, 0.1)
    return sae.eval()
