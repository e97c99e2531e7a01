"""Factories for the tests' small set-ups: a harvest config and a real store of a tiny model, a store of random
rows without a model, a train config and a tiny SAE run. Each starts from small, quiet defaults (named in its
docstring); a test passes every setting it depends on, so a reader sees them at the call and a change of
defaults changes no test's meaning.

Models come from conftest.py's fixtures (tiny_dit, tiny_pixart, ...) or its save_tiny_* builders.
"""

from __future__ import annotations

from pathlib import Path

from tide.harvest.config import HarvestConfig
from tide.harvest.run import harvest
from tide.store.reader import Store
from tide.train.fit.config import TrainConfig
from tide.train.fit.trainer import train

from tests.bench_train import synthetic_store

SMALL_HARVEST = dict(num_samples=2, num_steps=2, batch_size=2, progress=False)
"""What harvest_config sets unless told otherwise (every other field keeps HarvestConfig's default)."""

RANDOM_STORE = dict(num_samples=16, num_steps=4, tokens=8, d_model=16, batch_size=4, values="random")
"""What random_store sets unless told otherwise (every other argument keeps synthetic_store's default)."""

TINY_TRAIN = dict(
    archs=("topk",), k=(2,), expansion=2, batch_size=16, max_steps=2, warmup_steps=1, progress=False
)
"""What train_config sets unless told otherwise (every other field keeps TrainConfig's default)."""


def harvest_config(model: Path | str, out: Path | str, **overrides) -> HarvestConfig:
    """A HarvestConfig of the pipeline folder `model` into `out`: 2 samples of 2 denoising steps in batches
    of 2, no progress bar; HarvestConfig's defaults otherwise (all layers, resid, a quarter of the tokens,
    the model's own guidance, float16). `overrides` are HarvestConfig fields."""
    return HarvestConfig(model=str(model), out=out, **{**SMALL_HARVEST, **overrides})


def harvested(model: Path | str, out: Path | str, **overrides) -> Path:
    """Harvest harvest_config(model, out, **overrides) with its log silenced; return the store's path."""
    return harvest(harvest_config(model, out, **overrides), log=lambda m: None).out


def random_store(path: Path, **overrides) -> Store:
    """synthetic_store (tests/bench_train.py: the real writer, no model) at `path`: 16 samples x 4 steps x 8
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
