"""`make bench`: speed and size figures measured side by side in one run, printed as `NAME: VALUE` lines.

- harvest_overhead_ratio: harvest wall time / plain sampling wall time (same model, samples, steps, no
  capture, no writes, the same torch thread count: the harvest's cpu_threads), default harvest settings on
  the shipped model; the median of at least 3 back-to-back pairs' ratios (_min, _max: their spread). Aim:
  <= 1.05.
- harvest_cluster_scaling: wall time of that harvest (4 sample chunks) on a local dask cluster of 1 worker
  process / of 2 (`--workers 1` / `--workers 2`), every process on one torch thread. Aim: >= 1.8 on 2 cores.
- harvest_cluster_overhead: wall time on 1 worker / in this process on 1 torch thread, the same harvest: what
  the cluster path costs (the client's planning, dask, the worker's own model). Aim: <= 1.10.
- bytes_per_value: bytes on disk per stored activation value of that harvest (float16 is 2 uncompressed).
- features_vs_reader_ratio: rows/s of the `tide features` pass vs the store reader alone (tests/bench_features.py).
- the training-side ratios of tests/bench_train.py.

Runs alternate (plain, harvest, plain, harvest, ...) and each figure is a median, so that load from the
rest of the machine falls on both sides alike.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tide.harvest.capture import Conditioning
from tide.harvest.config import HarvestConfig
from tide.harvest.model import cpu_threads, load_model
from tide.harvest.run import harvest, plan
from tide.harvest.sampler import generate
from tide.store.inspect import disk_bytes
from tide.store.reader import open_store


def _plain_sampling(cfg: HarvestConfig) -> float:
    """Wall time of the same sampling with no hooks and no store, on the harvest's own CPU thread count
    (cfg.cpu_threads: a harvest runs its model calls on it, whatever the process's)."""
    model = load_model(cfg.model)
    meta, arrays = plan(cfg, model)
    lay = meta.layout()
    start = time.perf_counter()
    with cpu_threads(model.transformer.device, cfg.cpu_threads):
        for c in range(lay.num_sample_chunks):
            s = lay.sample_chunk(c)
            cond = Conditioning(class_labels=torch.as_tensor(arrays["labels"][s]))
            generate(model, cond, arrays["seeds"][s].tolist(), cfg.num_steps, meta.guidance_scale)
    return time.perf_counter() - start


def _harvest(cfg: HarvestConfig) -> float:
    shutil.rmtree(cfg.out, ignore_errors=True)
    start = time.perf_counter()
    harvest(cfg, log=lambda m: None)
    return time.perf_counter() - start


def bench_harvest(
    num_samples: int, repeats: int, work: Path, model: str | None = None, num_steps: int | None = None
) -> dict[str, float]:
    extra = {"model": model} if model else {}
    if num_steps is not None:
        extra["num_steps"] = num_steps
    cfg = HarvestConfig(
        out=work / "bench.zarr", num_samples=num_samples, progress=False, overwrite=True, **extra
    )
    _plain_sampling(cfg)  # warm-up: first-call allocations and lazy imports
    pairs = [(_plain_sampling(cfg), _harvest(cfg)) for _ in range(repeats)]
    plain, harvested = [p for p, _ in pairs], [h for _, h in pairs]
    # The median of back-to-back ratios: the machine's speed drifts between runs, and a drift hits both
    # halves of a pair alike; _min and _max give the spread.
    ratios = [h / p for p, h in pairs]
    store = open_store(cfg.out)
    lay = store.layout
    values = lay.num_samples * lay.num_steps * lay.tokens * lay.d_model * len(store.meta.act_names())
    act_bytes = sum(disk_bytes(cfg.out / n) for n in store.meta.act_names())
    return {
        "harvest_plain_sampling_s": statistics.median(plain),
        "harvest_wall_s": statistics.median(harvested),
        "harvest_overhead_ratio": statistics.median(ratios),
        "harvest_overhead_ratio_min": min(ratios),
        "harvest_overhead_ratio_max": max(ratios),
        "bytes_per_value": act_bytes / values,
        "bytes_per_value_all_files": disk_bytes(cfg.out) / values,
    }


def bench_cluster(
    num_samples: int, repeats: int, work: Path, model: str | None = None, num_steps: int | None = None
) -> dict[str, float]:
    """The same harvest in this process on 1 torch thread, on a local dask cluster of 1 single-threaded worker
    process, and on one of 2 (harvest/cluster.py), in turn, `repeats` times; medians. Each cluster is started
    and warmed before the clock starts (see _on_cluster)."""
    extra = {"model": model} if model else {}
    if num_steps is not None:
        extra["num_steps"] = num_steps
    # Four sample chunks, so that both workers have work.
    cfg = HarvestConfig(
        out=work / "cluster.zarr",
        num_samples=num_samples,
        batch_size=max(1, num_samples // 4),
        progress=False,
        overwrite=True,
        **extra,
    )
    times: dict[str, list[float]] = {"in_process": [], "1_worker": [], "2_workers": []}
    for _ in range(repeats):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            times["in_process"].append(_harvest(cfg))
        finally:
            torch.set_num_threads(threads)
        for n, name in ((1, "1_worker"), (2, "2_workers")):
            times[name].append(_on_cluster(cfg, n))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "harvest_cluster_in_process_s": med["in_process"],
        "harvest_cluster_1_worker_s": med["1_worker"],
        "harvest_cluster_2_workers_s": med["2_workers"],
        "harvest_cluster_scaling": med["1_worker"] / med["2_workers"],
        "harvest_cluster_overhead": med["1_worker"] / med["in_process"],
    }


def _on_cluster(cfg: HarvestConfig, workers: int) -> float:
    """Wall time of harvest_on_cluster(cfg) on a fresh local cluster of `workers` processes. Start-up is not
    timed, nor the workers' first imports and model load: a 1-sample-per-worker harvest of the same model runs
    first, so the workers are as a cluster is after its first chunk (the client's planning, its own model
    load included, is timed, as the in-process run's)."""
    from tide.harvest.cluster import connect, harvest_on_cluster

    warm = {"out": cfg.out.with_name("warm.zarr"), "num_samples": workers, "batch_size": 1, "num_steps": 2}
    shutil.rmtree(cfg.out, ignore_errors=True)
    with connect(workers=workers) as client:
        harvest_on_cluster(cfg.model_copy(update=warm), client, log=lambda m: None)
        start = time.perf_counter()
        harvest_on_cluster(cfg, client, log=lambda m: None)
        return time.perf_counter() - start


def bench_codecs(store_path: Path, work: Path, repeats: int = 3) -> dict[str, float]:
    """Compression ratio and read speed (relative to uncompressed) of candidate codecs on real activations."""
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    src = zarr.open_array(str(store_path / open_store(store_path).meta.act_names()[0]), mode="r")
    data = src[:]
    candidates = {
        "none": None,
        "zstd0_zarr_default": [ZstdCodec(level=0)],
        "blosc_zstd1_shuffle": [
            BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle, typesize=2, blocksize=256 << 10)
        ],
        "blosc_zstd1_bitshuffle": [
            BloscCodec(
                cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle, typesize=2, blocksize=256 << 10
            )
        ],
        "blosc_lz4_shuffle": [
            BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle, typesize=2, blocksize=256 << 10)
        ],
    }
    out: dict[str, float] = {}
    read_s: dict[str, float] = {}
    for name, comp in candidates.items():
        path = work / f"codec_{name}.zarr"
        arr = zarr.create_array(
            str(path), shape=data.shape, dtype=data.dtype, chunks=src.chunks, compressors=comp
        )
        arr[:] = data
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            zarr.open_array(str(path), mode="r")[:]
            times.append(time.perf_counter() - start)
        read_s[name] = statistics.median(times)
        out[f"codec_ratio_{name}"] = data.nbytes / disk_bytes(path)
    for name in candidates:
        out[f"codec_read_slowdown_{name}"] = read_s[name] / read_s["none"]
    return out


# Every benchmark at tiny sizes: the smoke test in `make test` runs this, so a change that breaks
# `make bench` fails CI. Its figures mean nothing.
QUICK = {"num_samples": 2, "num_steps": 4, "repeats": 1}
QUICK_TRAIN = ["--num-samples", "4", "--num-samples-d1152", "2", "--epochs", "1", "--batch-size", "256"]
QUICK_TRAIN += ["--train-steps", "2", "--repeats", "1", "--ddp-steps", "6"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument(
        "--num-steps", type=int, default=None, help="Denoising steps (default: the harvest's)."
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=None, help="Pipeline folder (default: the shipped model).")
    parser.add_argument("--skip-train", action="store_true", help="Only the harvest figures.")
    parser.add_argument("--quick", action="store_true", help="Every benchmark at tiny sizes (a smoke test).")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # At least 3 pairs for the harvest's figure, whose halves are each under a minute: 2 swung by 9%.
        pairs = args.repeats if args.quick else max(3, args.repeats)
        figures |= bench_harvest(args.num_samples, pairs, work, args.model, args.num_steps)
        for name, value in figures.items():
            print(f"{name}: {value:.4g}", flush=True)
        cluster = bench_cluster(args.num_samples, args.repeats, work, args.model, args.num_steps)
        for name, value in cluster.items():
            print(f"{name}: {value:.4g}", flush=True)
        figures |= cluster
        codecs = bench_codecs(work / "bench.zarr", work, repeats=args.repeats)
        for name, value in codecs.items():
            print(f"{name}: {value:.4g}", flush=True)
        figures |= codecs
        from tests.bench_features import bench_features

        tiny = {"train_steps": 2, "train_batch": 64} if args.quick else {}
        feats = bench_features(work / "bench.zarr", work, args.repeats, **tiny)
        for name, value in feats.items():
            print(f"{name}: {value:.4g}", flush=True)
        figures |= feats
    if not args.skip_train:
        from tests import bench_train

        figures |= bench_train.main(QUICK_TRAIN if args.quick else [])
    return figures


if __name__ == "__main__":
    main()
