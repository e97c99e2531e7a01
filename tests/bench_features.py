"""`make bench` figure of `tide features`: rows/s of the feature pass vs the store reader alone.

- features_vs_reader_ratio: rows/s of train/analysis/features.py's `collect` (read, the SAE's encoder, per-latent sums,
  streaming top-K, per-sample maxima for the class AUROC) / rows/s of the same unshuffled ActivationLoader
  pass with nothing done to its batches, on the same store, same rows, same batch size. Aim: >= 0.8.
- features_vs_sae_encode_ratio: the same pass vs that reader plus the SAE's encoder (`normalize_input`,
  `encode`) on every batch and nothing else: what the per-latent bookkeeping costs on top of the SAE itself.
Runs alternate (reader, reader + SAE, features, ...) and each figure is a median.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tide.store.reader import open_store
from tide.train.analysis.features import FeaturesConfig, collect
from tide.train.fit.checkpoint import load_sae
from tide.train.fit.config import TrainConfig
from tide.train.fit.data import ActivationLoader
from tide.train.fit.trainer import train


@torch.no_grad()
def _reader(store, loaded, chunks: list[int], batch_size: int, sae: bool = False) -> float:
    loader = ActivationLoader(
        store,
        [loaded.meta.array],
        chunks,
        batch_size,
        shuffle=False,
        drop_last=False,
        step_range=loaded.meta.step_range,
    )
    start, rows = time.perf_counter(), 0
    for batch in loader.batches(epochs=1):
        rows += batch.step_B.shape[0]
        if sae:
            loaded.sae.encode(loaded.sae.normalize_input(batch.x_ABD[0].float(), batch.t_B), batch.t_B)
    return rows / (time.perf_counter() - start)


def _features(store, loaded, cfg: FeaturesConfig) -> float:
    start = time.perf_counter()
    stats = collect(loaded, store, cfg)
    return float(stats.rows_S.sum()) / (time.perf_counter() - start)


def bench_features(
    store_path: Path, work: Path, repeats: int = 2, train_steps: int = 20, train_batch: int = 1024
) -> dict[str, float]:
    """The default SAE of `tide train` (tide arch, middle layer, 8x, k=16), briefly trained on the store, then
    both passes over every done sample of it."""
    cfg = TrainConfig(
        store=store_path,
        out=work / "features_saes",
        archs=("tide",),
        max_steps=train_steps,
        warmup_steps=1,
        batch_size=train_batch,
        val_fraction=0,
        progress=False,
        overwrite=True,
    )
    loaded = load_sae(train(cfg, log=lambda m: None).saes[0])
    store = open_store(store_path)
    fcfg = FeaturesConfig(split="all", progress=False)
    chunks = store.done_chunks()
    _features(store, loaded, fcfg)  # warm-up
    reader, forward, features = [], [], []
    for _ in range(repeats):
        reader.append(_reader(store, loaded, chunks, fcfg.batch_size))
        forward.append(_reader(store, loaded, chunks, fcfg.batch_size, sae=True))
        features.append(_features(store, loaded, fcfg))
    reader_s, forward_s, features_s = (statistics.median(v) for v in (reader, forward, features))
    return {
        "features_reader_rows_per_s": reader_s,
        "features_sae_encode_rows_per_s": forward_s,
        "features_rows_per_s": features_s,
        "features_vs_reader_ratio": features_s / reader_s,
        "features_vs_sae_encode_ratio": features_s / forward_s,
    }
