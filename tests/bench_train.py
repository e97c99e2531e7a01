"""Training-side speed figures, measured side by side in one run and printed as `NAME: VALUE` lines.

- reader_vs_memmap_ratio: shuffled-batch throughput of ActivationLoader reading the Zarr store, divided by
  the same loader reading the same rows, in the same shuffled chunk order, from a raw .npy memmap of the
  array (page-cached, uncompressed). Measures what the Zarr layer and its compression cost. Aim >= 0.8.
- train_cache_vs_memory_ratio: training throughput (a tide and a topk SAE, one optimiser step each per
  batch) fed from the Zarr store, divided by the same training fed from the rows held in memory. Aim >= 0.9.

Runs alternate (store, baseline, store, baseline, ...) and each figure is a ratio of medians, so that
load from the rest of the machine falls on both sides alike. torch runs on one thread unless --threads says
otherwise: on a 2-core machine shared with other work, OpenMP's two threads wait on each other at every
small op (measured 10x slower elementwise ops), so two-thread figures swing with the neighbours' load. `synthetic_store` is also what the tests use
to make stores without running a diffusion model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from store.reader import Store, configure_read_threads, open_store
from store.schema import (
    ModelInfo,
    SchedulerInfo,
    StoreMeta,
    TokenSampling,
    choose_chunks,
    numpy_storage_dtype,
)
from store.writer import StoreWriter, create_store


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
    codec: str = "blosc-zstd",
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
    timesteps = np.linspace(999, 0, num_steps).round(3)
    root = create_store(path, meta, timesteps, np.arange(num_samples), np.arange(num_samples) % 10, None)
    writer, lay = StoreWriter(root, meta), meta.layout()
    rng = np.random.default_rng(seed)
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
    return open_store(path)


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x)).bfloat16().view(torch.int16).numpy().view(np.uint16)
    return x.astype(dtype)


def _drain(batches) -> tuple[int, float]:
    """Rows and seconds to consume every batch, timed from the first batch on (start-up excluded)."""
    it = iter(batches)
    rows = len(next(it).t_B)
    start = time.perf_counter()
    for b in it:
        rows += len(b.t_B)
    return rows, time.perf_counter() - start


def bench_reader(store: Store, memmap: np.ndarray, batch_size: int, repeats: int) -> dict[str, float]:
    from train.data import ActivationLoader

    def rate(source) -> float:
        loader = ActivationLoader(
            store, ["resid_l00"], store.done_chunks(), batch_size, seed=0, source=source
        )
        rows, seconds = _drain(loader.batches(epochs=1))
        return rows / seconds

    rate(None), rate([memmap])  # warm the page cache and the allocator
    zarr_rates, mm_rates = [], []
    for _ in range(repeats):
        zarr_rates.append(rate(None))
        mm_rates.append(rate([memmap]))
    z, m = statistics.median(zarr_rates), statistics.median(mm_rates)
    return {"reader_zarr_rows_per_s": z, "reader_memmap_rows_per_s": m, "reader_vs_memmap_ratio": z / m}


def _memory_batches(x_ND: torch.Tensor, step_N: torch.Tensor, t_S: torch.Tensor, batch_size: int, steps: int):
    """The ideal feed: rows already in memory as one tensor, each batch one gather of a random permutation."""
    from train.data import Batch, Position

    perm = torch.randperm(len(x_ND), generator=torch.Generator().manual_seed(0))
    for i in range(steps):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        yield Batch(x_ND[idx][None], t_S[step_N[idx]], step_N[idx], idx, Position(0, (i + 1) * batch_size))


def bench_train(store: Store, work: Path, steps: int, batch_size: int, repeats: int) -> dict[str, float]:
    from train.config import TrainConfig
    from train.trainer import _build, fit

    # Windows of a few batches, so that chunks are read (and decompressed) while the SAEs train.
    cfg = TrainConfig(
        store=store.path,
        out=work / "saes",
        layers="0",
        max_steps=steps,
        warmup_steps=1,
        batch_size=batch_size,
        window_rows=4 * batch_size,
        val_fraction=0,
        progress=False,
        overwrite=True,
        log_every=10**6,
        checkpoint_every=10**6,
    )
    lay = store.layout
    x_ND = torch.from_numpy(store.root["resid_l00"][:].reshape(-1, lay.d_model))
    step_N = torch.arange(lay.num_steps).repeat_interleave(lay.tokens).repeat(lay.num_samples)
    t_S = torch.as_tensor(store.timesteps, dtype=torch.float32)

    def rate(from_store: bool) -> float:
        run, loader = _build(cfg, store, torch.device("cpu"))
        batches = loader.batches() if from_store else _memory_batches(x_ND, step_N, t_S, batch_size, steps)
        first: list[float] = []

        def timed():
            for b in batches:
                first.append(first[0] if first else time.perf_counter())  # start-up (first read) excluded
                yield b

        fit(run, timed(), cfg)
        seconds = time.perf_counter() - first[0]
        batches.close()
        return run.rows / seconds

    rate(True), rate(False)
    cache, memory = [], []
    for _ in range(repeats):
        cache.append(rate(True))
        memory.append(rate(False))
    c, m = statistics.median(cache), statistics.median(memory)
    return {"train_cache_rows_per_s": c, "train_memory_rows_per_s": m, "train_cache_vs_memory_ratio": c / m}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-samples",
        type=int,
        default=400,
        help="Samples of the synthetic store (x 50 steps x 16 tokens).",
    )
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--store", type=Path, default=None, help="Reuse this store (its first array) instead."
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (see the module docstring)."
    )
    # tests/bench.py calls main() with no arguments under its own command line: defaults, not its flags.
    args = parser.parse_args(argv or [])
    configure_read_threads(4)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.store is not None:
            store = open_store(args.store)
        else:
            store = synthetic_store(
                work / "bench.zarr",
                num_samples=args.num_samples,
                num_steps=50,
                tokens=16,
                d_model=args.d_model,
                batch_size=50,
                layers=(0,),
                values="random",
            )
        name = store.meta.act_names()[0]
        np.save(work / "rows.npy", store.root[name][:])
        memmap = np.load(work / "rows.npy", mmap_mode="r")
        figures = bench_reader(store, memmap, args.batch_size, args.repeats)
        figures |= bench_train(store, work, args.train_steps, args.batch_size, args.repeats)
    for key in (
        "reader_zarr_rows_per_s",
        "reader_memmap_rows_per_s",
        "train_cache_rows_per_s",
        "train_memory_rows_per_s",
    ):
        print(f"{key}: {figures[key]:.4g}")
    print(f"torch_threads: {torch.get_num_threads()}")
    print(f"reader_vs_memmap_ratio: {figures['reader_vs_memmap_ratio']:.3f}")
    print(f"train_cache_vs_memory_ratio: {figures['train_cache_vs_memory_ratio']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
