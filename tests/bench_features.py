"""`make bench` figure of `tide features`: rows/s of the feature pass vs the store reader alone.

- features_vs_reader_ratio: rows/s of train/features.py's `collect` (read, SAE forward_raw, per-latent sums,
  streaming top-K, per-sample maxima for the class AUROC) / rows/s of the same unshuffled ActivationLoader
  pass with nothing done to its batches, on the same store, same rows, same batch size. Aim: >= 0.8.
Runs alternate (reader, features, reader, ...) and each figure is a median.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tide.store.reader import open_store
from tide.train.checkpoint import load_sae
from tide.train.config import TrainConfig
from tide.train.data import ActivationLoader
from tide.train.features import FeaturesConfig, collect
from tide.train.trainer import train


def _reader(store, loaded, chunks: list[int], batch_size: int) -> float:
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
    reader, features = [], []
    for _ in range(repeats):
        reader.append(_reader(store, loaded, chunks, fcfg.batch_size))
        features.append(_features(store, loaded, fcfg))
    return {
        "features_reader_rows_per_s": statistics.median(reader),
        "features_rows_per_s": statistics.median(features),
        "features_vs_reader_ratio": statistics.median(features) / statistics.median(reader),
    }
