"""Factories for the tests' small set-ups, each starting from small, quiet defaults named in its docstring:

- real stores of a tiny pipeline: harvest_config (the config alone), harvested, and tiny_store (the splice
  and steer tests' store);
- stores without a model, through the real writer: synthetic_store, and random_store (random rows);
- SAE runs: train_config (the config alone) and trained;
- SAE folders without training, for splice and steer: write_sae, identity_sae, random_sae.

A test passes every setting its assertions depend on, so a reader sees them at the call and a change of
defaults changes no test's meaning. Models come from conftest.py's fixtures (tiny_dit, tiny_pixart, ...) or
its save_tiny_* builders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tide.harvest.config import HarvestConfig
from tide.harvest.run import harvest
from tide.store.reader import Store, open_store
from tide.store.schema import (
    DEFAULT_CODEC,
    ModelInfo,
    SchedulerInfo,
    StoreMeta,
    TokenSampling,
    choose_chunks,
    numpy_storage_dtype,
    to_stored,
)
from tide.store.writer import StoreWriter, create_store
from tide.train.fit.checkpoint import SAEMeta, StoreRef, save_sae
from tide.train.fit.config import TrainConfig
from tide.train.fit.data import Split
from tide.train.fit.trainer import train
from tide.train.sae.model import SAEConfig, build_sae

SMALL_HARVEST = dict(num_samples=2, num_steps=2, batch_size=2, progress=False)
"""What harvest_config sets unless told otherwise (every other field keeps HarvestConfig's default)."""

RANDOM_STORE = dict(num_samples=16, num_steps=4, tokens=8, d_model=16, batch_size=4, values="random")
"""What random_store sets unless told otherwise (every other argument keeps synthetic_store's default)."""

TINY_TRAIN = dict(
    archs=("topk",), k=(2,), expansion=2, batch_size=16, max_steps=2, warmup_steps=1, progress=False
)
"""What train_config sets unless told otherwise (every other field keeps TrainConfig's default)."""

NUM_STEPS = 4
"""Denoising steps of tiny_store's harvest (write_sae's SAEs cover them all)."""


def harvest_config(model: Path | str, out: Path | str, **overrides) -> HarvestConfig:
    """A HarvestConfig of the pipeline folder `model` into `out`: 2 samples of 2 denoising steps in batches
    of 2, no progress bar; HarvestConfig's defaults otherwise (all layers, resid, a quarter of the tokens,
    the model's own guidance, float16). `overrides` are HarvestConfig fields."""
    return HarvestConfig(model=str(model), out=out, **{**SMALL_HARVEST, **overrides})


def harvested(model: Path | str, out: Path | str, **overrides) -> Path:
    """Harvest harvest_config(model, out, **overrides) with its log silenced; return the store's path."""
    return harvest(harvest_config(model, out, **overrides), log=lambda m: None).out


def tiny_store(model: Path, out: Path) -> Path:
    """The splice and steer tests' store of `model` at `out`: 4 samples x NUM_STEPS steps in batches of 2, layer
    1's resid and mlp, every token, guidance 2, float32 (so an exact SAE spliced in gives the clean images)."""
    return harvested(
        model, out, num_samples=4, num_steps=NUM_STEPS, layers="1", sites="resid,mlp", token_fraction=1.0,
        guidance_scale=2.0, dtype="float32",
    )  # fmt: skip


def synthetic_store(
    path: Path,
    *,
    num_samples: int = 12,
    num_steps: int = 5,
    tokens: int = 4,
    d_model: int = 8,
    batch_size: int = 3,
    layers: tuple[int, ...] = (0,),
    sites: tuple[str, ...] = ("resid",),
    steps_per_chunk: int | None = None,
    tokens_per_chunk: int | None = None,
    dtype: str = "float16",
    codec: str = DEFAULT_CODEC,
    values: str = "index",
    seed: int = 0,
) -> Store:
    """A tide store written with the real writer, without a model.

    values="index": row (i, s, t) of array number a holds [i, s, t, a, 0, ...] plus a small per-channel
    offset, so tests can tell every row apart; values="random": Gaussian rows whose mean and scale vary
    with the step, like a DiT residual.
    """
    itemsize = numpy_storage_dtype(dtype).itemsize
    spc, tpc = choose_chunks(batch_size, num_steps, tokens, d_model, itemsize)
    meta = StoreMeta(
        tide_version="0+synthetic",
        created="1970-01-01T00:00:00+00:00",
        model=ModelInfo(
            id="synthetic", path="synthetic", transformer_class="Synthetic", transformer_config={"seed": seed}
        ),
        scheduler=SchedulerInfo(class_name="DDPMScheduler", config={"num_train_timesteps": 1000}),
        num_inference_steps=num_steps,
        step_indices=list(range(num_steps)),
        guidance_scale=1.0,
        cfg_branch="cond",
        conditioning="class",
        sites=list(sites),
        layers=list(layers),
        num_layers=max(layers) + 1,
        d_model=d_model,
        num_samples=num_samples,
        batch_size=batch_size,
        steps_per_chunk=steps_per_chunk or spc,
        tokens_per_chunk=tokens_per_chunk or tpc,
        tokens=TokenSampling(num_tokens=tokens, fraction=1.0, kept=tokens),
        dtype=dtype,
        codec=codec,
    )
    _write_rows(path, meta, values, np.random.default_rng(seed))
    return open_store(path)


def _write_rows(path: Path, meta: StoreMeta, values: str, rng: np.random.Generator) -> None:
    """Create the store of `meta` at `path` and write every sample chunk of synthetic_store's `values`."""
    num_samples, num_steps = meta.num_samples, meta.num_inference_steps
    tokens, d_model, dtype = meta.tokens.num_tokens, meta.d_model, meta.dtype
    timesteps = np.linspace(999, 0, num_steps).round(3)
    root = create_store(path, meta, timesteps, np.arange(num_samples), np.arange(num_samples) % 10, None)
    writer, lay = StoreWriter(root, meta), meta.layout()
    step_scale_S = 1 + np.arange(num_steps) / num_steps
    for c in range(lay.num_sample_chunks):
        samples = lay.sample_chunk(c)
        b = samples.stop - samples.start
        for a, name in enumerate(meta.act_names()):
            if values == "index":
                x = np.zeros((b, num_steps, tokens, d_model), dtype=np.float32)
                x[..., 0] = np.arange(samples.start, samples.stop)[:, None, None]
                x[..., 1] = np.arange(num_steps)[None, :, None]
                x[..., 2] = np.arange(tokens)[None, None, :]
                x[..., 3] = a
                x[..., 4:] = 0.25 * np.arange(4, d_model) % 3
            else:
                x = rng.standard_normal((b, num_steps, tokens, d_model), dtype=np.float32)
                x = x * step_scale_S[None, :, None, None] + step_scale_S[None, :, None, None] * 0.5
            for sc in range(lay.num_step_chunks):
                steps = lay.step_chunk(sc)
                writer.submit(writer.write_block, name, c, steps, _to_storage(x[:, steps], dtype))
        writer.submit(writer.mark_done, c)
    writer.close()


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    return to_stored(torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype)))


def random_store(path: Path, **overrides) -> Store:
    """synthetic_store (the real writer, no model) at `path`: 16 samples x 4 steps x 8
    tokens x D 16 in batches of 4, Gaussian rows whose mean and scale vary with the step, like a DiT's; one
    layer (0), resid, float16. `overrides` are synthetic_store's arguments."""
    return synthetic_store(path, **{**RANDOM_STORE, **overrides})


def train_config(store: Path | str, out: Path, **overrides) -> TrainConfig:
    """A TrainConfig of `store` into `out`: one topk SAE with k=2 and 2 latents per input dimension, 2
    optimiser steps of 16 rows after a warm-up of 1, no progress bar; TrainConfig's defaults otherwise (the
    middle layer, resid, a tenth of the chunks held out, device auto). `overrides` are TrainConfig fields."""
    return TrainConfig(store=store, out=out, **{**TINY_TRAIN, **overrides})


def trained(store: Path | str, out: Path, **overrides) -> list[Path]:
    """Train train_config(store, out, **overrides) with its log silenced; return its SAE folders in spec
    order."""
    return train(train_config(store, out, **overrides), log=lambda m: None).saes


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
