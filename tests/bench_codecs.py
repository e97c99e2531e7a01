"""The codec table of store/FORMAT.md: size and read speed of each candidate codec on real activations.

`python -m tests.bench_codecs` harvests two models in float32 and rewrites one activation array of each with
every candidate codec, at float16, bfloat16 and float32 (cast from the same float32 values):
- `demo`: the shipped digits model (d = 128), the `make harvest` settings on fewer samples;
- `dit-xl-width`: a DiT built from config at DiT-XL/2's width (d = 1152, 16 heads, 2 x 2 patches of a 32 x 32
  latent: 256 tokens) with 4 blocks of random weights (the adaLN gates randomised too, else every block is
  the identity), run over 10 denoising steps: no DiT-XL weights can be downloaded here.

Per (model, dtype, codec) it prints the size ratio (raw bytes / chunk file bytes, checksum included) and the
read rate in rows per CPU-second: every chunk read with `store.reader.read_into`, the training loader's
path (checksum verified, decoded into a buffer), on one thread, timed by the process's CPU clock so that
other work on a shared machine does not count. Best of `--repeats` passes, the page cache warm.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from tide.store.schema import chunk_region
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec


def candidates(itemsize: int) -> dict[str, list]:
    """name -> the compressors of a data array (before its crc32c), blosc with 256 KB blocks like tide's."""

    def blosc(cname: str, level: int, shuffle: BloscShuffle) -> list:
        return [
            BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=itemsize, blocksize=256 << 10)
        ]

    shuffle, bitshuffle, noshuffle = BloscShuffle.shuffle, BloscShuffle.bitshuffle, BloscShuffle.noshuffle
    return {
        "none": [],
        "blosc-lz4 noshuffle": blosc("lz4", 5, noshuffle),
        "blosc-lz4 shuffle": blosc("lz4", 5, shuffle),
        "blosc-lz4 bitshuffle": blosc("lz4", 5, bitshuffle),
        "blosc-zstd1 shuffle": blosc("zstd", 1, shuffle),
        "blosc-zstd1 bitshuffle": blosc("zstd", 1, bitshuffle),
        "blosc-zstd3 shuffle": blosc("zstd", 3, shuffle),
        "blosc-zstd5 shuffle": blosc("zstd", 5, shuffle),
        "zstd1": [ZstdCodec(level=1)],
        "zstd3": [ZstdCodec(level=3)],
    }


def _save_wide_dit(folder: Path) -> Path:
    """A DiT of DiT-XL/2's width from config, random weights, 4 blocks, saved as a pipeline folder."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=4,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip
    with torch.no_grad():
        for p in dit.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    dit.save_pretrained(folder / "transformer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def harvested(work: Path, demo_samples: int, wide_samples: int) -> dict[str, tuple[zarr.Array, np.ndarray]]:
    """{model: (the float32 array harvested, its values)}, one mid-depth residual array per model."""
    from tide.harvest.config import HarvestConfig
    from tide.harvest.run import harvest
    from tide.store.reader import open_store

    runs = {
        "demo": dict(num_samples=demo_samples, layers="3"),
        "dit-xl-width": dict(
            model=str(_save_wide_dit(work / "wide-dit")), num_samples=wide_samples, num_steps=10,
            layers="2", batch_size=wide_samples, guidance_scale=1.0, labels="random",
        ),
    }  # fmt: skip
    out = {}
    for name, extra in runs.items():
        cfg = HarvestConfig(out=work / f"{name}.zarr", dtype="float32", codec="none", progress=False, **extra)
        harvest(cfg, log=lambda m: None)
        store = open_store(cfg.out)
        arr = store.array(store.meta.act_names()[0])
        out[name] = (arr, arr[:])
    return out


def as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as stored at `dtype` (bfloat16 as its raw uint16 bits, rounded to nearest)."""
    from tide.store.schema import to_stored

    return to_stored(torch.from_numpy(values).to(getattr(torch, dtype)))


def measure(
    src: zarr.Array, values: np.ndarray, compressors: list, path: Path, repeats: int
) -> tuple[float, float]:
    """(size ratio, rows per CPU-second) of `values` written with `compressors` in `src`'s chunk grid."""
    from tide.store.inspect import disk_bytes
    from tide.store.reader import read_into

    arr = zarr.create_array(
        str(path), shape=values.shape, dtype=values.dtype, chunks=src.chunks, fill_value=0,
        compressors=[*compressors, Crc32cCodec()], config={"write_empty_chunks": True},
    )  # fmt: skip
    arr[:] = values
    regions = [chunk_region(c, arr.shape, arr.chunks) for c in np.ndindex(*arr.cdata_shape)]
    buffers = [np.empty(tuple(s.stop - s.start for s in r), values.dtype) for r in regions]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the page cache
        start = time.process_time()
        for region, buf in zip(regions, buffers, strict=True):
            read_into(arr, region, buf)
        best = min(best, time.process_time() - start)
    assert all(np.array_equal(b, values[r]) for r, b in zip(regions, buffers, strict=True))
    rows = values.size // values.shape[-1]
    ratio = values.nbytes / disk_bytes(path)
    shutil.rmtree(path)
    return ratio, rows / best


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-samples", type=int, default=100)
    parser.add_argument("--wide-samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from tide.store.reader import configure_read_threads

    configure_read_threads(1)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model, (src, values) in harvested(work, args.demo_samples, args.wide_samples).items():
            print(f"{model}: {src.shape} chunks {src.chunks}", flush=True)
            for dtype in ("float16", "bfloat16", "float32"):
                stored = as_dtype(values, dtype)
                for codec, comps in candidates(stored.itemsize).items():
                    ratio, rate = measure(src, stored, comps, work / "c.zarr", args.repeats)
                    rows.append(dict(model=model, dtype=dtype, codec=codec, ratio=ratio, rows_per_cpu_s=rate))
                    print(f"| {model} | {dtype} | {codec} | {ratio:.3f} | {rate / 1e6:.2f} M |", flush=True)
    return rows


if __name__ == "__main__":
    main()
