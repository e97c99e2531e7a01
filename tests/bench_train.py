"""Training-side speed figures, measured side by side in one run and printed as `NAME: VALUE` lines.

- reader_vs_memmap_ratio: shuffled-batch throughput of ActivationLoader reading the Zarr store, divided by
  the same loader reading the same rows, in the same shuffled chunk order, from a raw .npy memmap of the
  array (page-cached, uncompressed). Measures what the Zarr layer, the checksums and the codec cost; with the
  default codec (none) at d = 128 and d = 1152 (`_d1152`), and with blosc-zstd at d = 1152
  (`_d1152_codec_blosc_zstd`). Aim >= 0.9 with the default codec. `reader_vs_memmap_cpu_ratio`: the same
  by CPU time (rows per CPU-second of the process, every thread), which load from other processes barely
  changes: what the store's own work (mapping, crc32c) costs against the memmap side's.
- reader_thread_scaling_d1152: the loader's rows/s at d = 1152 with 2 read threads over 1 (aim >= 1.8 on 2
  cores: reading scales with cores). `reader_thread_cpu_cost_d1152`: CPU per row with 2 threads over 1 (1.0:
  the second thread adds no work, so on 2 free cores only the serial share keeps the scaling under 2).
  `reader_raw_thread_scaling_d1152`: the same data movement (map, crc32c, scatter) in plain numpy, 2
  threads over 1: the ceiling the machine's cores and memory set for it.
- train_cache_vs_memory_ratio: training throughput (a tide and a topk SAE, one optimiser step each per
  batch) fed from the Zarr store, divided by the same training fed from the rows held in memory. Aim >= 0.9.
- train_ddp_scaling: rows/s of `tide train --nproc 2` (2 torchrun ranks, gloo, each reading and training its
  share of every batch) divided by rows/s of one `tide train` process, both 1 torch thread and 1 read thread
  per process, same store, SAEs and global batch; runs alternate and the figure is the median of the pairs'
  ratios (_min and _max give the spread). Aim >= 1.7 on 2 cores. Start-up (imports, the first window's read)
  is left out: rates come from the run's own metrics.jsonl after its first logged interval.

Runs alternate (store, baseline, store, baseline, ...) and each figure is a ratio of medians, so that
load from the rest of the machine falls on both sides alike. torch runs on one thread unless --threads says
otherwise: on a 2-core machine shared with other work, OpenMP's two threads wait on each other at every
small op (measured 10x slower elementwise ops), so two-thread figures swing with the neighbours' load. The
stores are tests/factories.py's `synthetic_store`, the one the tests make stores without a model with.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tide.store.reader import Store, configure_read_threads, default_read_threads, open_store
from tide.store.schema import DEFAULT_CODEC

from tests.factories import synthetic_store


def bench_reader(store: Store, batch_size: int, repeats: int, epochs: int, work: Path) -> dict[str, float]:
    """Rows/s of shuffled batches from the store and from a raw .npy memmap of the same array.

    Both sides are the same ActivationLoader (same chunk order, windows and permutations); only where a
    chunk's bytes come from differs. Each rate is all rows over the time from asking for batches to the
    last one, start-up included, over `epochs` epochs of many windows: nothing read ahead is left out.
    """
    from tide.train.fit.data import ActivationLoader

    name = store.meta.act_names()[0]
    np.save(work / "rows.npy", store.root[name][:])
    memmap = np.load(work / "rows.npy", mmap_mode="r")

    def rate(source) -> Rate:
        loader = ActivationLoader(store, [name], store.done_chunks(), batch_size, seed=0, source=source)
        return _timed(lambda: sum(len(b.t_B) for b in loader.batches(epochs=epochs)))

    rate(None), rate([memmap])  # warm the page cache and the allocator
    pairs = [(rate(None), rate([memmap])) for _ in range(repeats)]
    return {
        "rows_per_s": statistics.median(z.rows_per_s for z, _ in pairs),
        "memmap_rows_per_s": statistics.median(m.rows_per_s for _, m in pairs),
        # The median of back-to-back ratios: this machine's speed drifts between runs (2x seen on a shared
        # 2-core VM), and a drift hits both halves of a pair alike.
        "vs_memmap_ratio": statistics.median(z.rows_per_s / m.rows_per_s for z, m in pairs),
        "vs_memmap_cpu_ratio": statistics.median(m.cpu_us_per_row / z.cpu_us_per_row for z, m in pairs),
    }


class Rate(NamedTuple):
    rows: int
    rows_per_s: float
    cpu_us_per_row: float
    """CPU time of this process (every thread) per row: what load from other processes barely changes."""


def _timed(run: Callable[[], int]) -> Rate:
    """Rows/s and CPU-µs/row of `run()`, which returns the rows it read."""
    start, cpu = time.perf_counter(), time.process_time()
    rows = run()
    return Rate(rows, rows / (time.perf_counter() - start), (time.process_time() - cpu) / rows * 1e6)


def bench_thread_scaling(store: Store, batch_size: int, repeats: int, epochs: int) -> dict[str, float]:
    """Rows/s of the same loader (same chunks, windows and permutations) with 2 read threads against 1,
    alternating, as a median of back-to-back ratios: whether reading scales with cores (GIL-bound work in
    the read threads would keep it near 1)."""
    from tide.train.fit.data import ActivationLoader

    name = store.meta.act_names()[0]

    def rate(threads: int) -> Rate:
        loader = ActivationLoader(
            store, [name], store.done_chunks(), batch_size, seed=0, read_threads=threads
        )
        return _timed(lambda: sum(len(b.t_B) for b in loader.batches(epochs=epochs)))

    rate(1), rate(2)
    pairs = [(rate(2), rate(1)) for _ in range(repeats)]
    return {
        "reader_rows_per_s_d1152_2_threads": statistics.median(two.rows_per_s for two, _ in pairs),
        "reader_rows_per_s_d1152_1_thread": statistics.median(one.rows_per_s for _, one in pairs),
        "reader_thread_scaling_d1152": statistics.median(
            two.rows_per_s / one.rows_per_s for two, one in pairs
        ),
        # CPU per row with 2 threads over 1: above 1, the second thread adds work (contention, waiting that
        # spins); 2 / this bounds the scaling on 2 free cores (less the serial share on the background thread).
        "reader_thread_cpu_cost_d1152": statistics.median(
            two.cpu_us_per_row / one.cpu_us_per_row for two, one in pairs
        ),
    }


def bench_raw_scaling(
    store: Store, repeats: int, epochs: int, window_rows: int = 1 << 17
) -> dict[str, float]:
    """The machine's own ceiling for the read threads' work, with nothing of tide's: each chunk file of the
    store's first array mapped once, its crc32c computed and its rows scattered to random rows of one
    window-sized array (allocated once, so no page is zeroed while timed), the files dealt round-robin to 2
    threads against 1, `epochs` passes over them, alternating, as a median of back-to-back ratios. It is the
    loader's data movement alone: if 2 threads do not reach 1.8x here, the cores' shared memory bandwidth,
    not the loader, keeps reader_thread_scaling_d1152 under it."""
    import mmap
    import threading

    import crc32c

    arr = store.root[store.meta.act_names()[0]]
    d, dtype = store.layout.d_model, arr.dtype
    files = sorted(p for p in (Path(store.path) / arr.path / "c").rglob("*") if p.is_file())
    chunks = []
    for f in files:
        with open(f, "rb") as fh:
            chunks.append(np.frombuffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), np.uint8))
    window_ND = np.zeros((window_rows, d), dtype)  # touched once here, so its pages exist before timing
    # Chunk k's rows go to their own random rows of the window (a window's worth of chunks fills it once).
    perm = np.random.default_rng(0).permutation(window_rows)
    n = (len(chunks[0]) - 4) // (d * dtype.itemsize)
    per_window = window_rows // n
    dest = [
        perm[(k % per_window) * n :][: (len(c) - 4) // (d * dtype.itemsize)] for k, c in enumerate(chunks)
    ]

    def scatter(mine: list[int]) -> None:
        for k in mine:
            payload = chunks[k][:-4]
            crc32c.crc32c(payload)
            window_ND[dest[k]] = payload.view(dtype).reshape(-1, d)

    def rate(threads: int) -> float:
        start = time.perf_counter()
        for _ in range(epochs):
            mine = [list(range(k, len(chunks), threads)) for k in range(threads)]
            workers = [threading.Thread(target=scatter, args=(m,)) for m in mine]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        return epochs * sum(len(c) - 4 for c in chunks) / (d * dtype.itemsize) / (time.perf_counter() - start)

    rate(1), rate(2)
    pairs = [(rate(2), rate(1)) for _ in range(repeats)]
    return {"reader_raw_thread_scaling_d1152": statistics.median(two / one for two, one in pairs)}


def _memory_batches(x_ND: torch.Tensor, step_N: torch.Tensor, t_S: torch.Tensor, batch_size: int, steps: int):
    """The ideal feed: rows already in memory (on the SAEs' device) as one tensor, each batch one gather of a
    random permutation."""
    from tide.train.fit.data import Batch, Position

    perm = torch.randperm(len(x_ND), generator=torch.Generator().manual_seed(0)).to(x_ND.device)
    for i in range(steps):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        yield Batch(x_ND[idx][None], t_S[step_N[idx]], step_N[idx], idx, Position(0, (i + 1) * batch_size))


def bench_train(store: Store, work: Path, steps: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Training rows/s (a tide and a topk SAE, on CUDA when present) fed from the store, and from memory."""
    from tide.train.fit.config import TrainConfig
    from tide.train.fit.trainer import fit, prepare

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
    x_ND = torch.from_numpy(store.root[store.meta.act_names()[0]][:].reshape(-1, lay.d_model))
    step_N = torch.arange(lay.num_steps).repeat_interleave(lay.tokens).repeat(lay.num_samples)
    t_S = torch.as_tensor(store.timesteps, dtype=torch.float32)

    def rate(from_store: bool) -> float:
        run, loader, device = prepare(cfg, log=lambda m: None)
        if from_store:
            batches = loader.batches()
        else:
            on = (x_ND.to(device), step_N.to(device), t_S.to(device))
            batches = _memory_batches(*on, batch_size, steps)
        first: list[float] = []

        def timed():
            for b in batches:
                first.append(first[0] if first else time.perf_counter())  # start-up (first read) excluded
                yield b

        fit(run, timed(), cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
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


def _steady_rows_per_s(metrics: Path) -> float:
    """Rows/s of a run from its metrics.jsonl, leaving out the first logged interval (start-up: the first
    window's read, step 0's initialisation): each line's interval took (its rows - the last line's) / its
    rows_per_s seconds."""
    import json

    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [line["rows"] for line in lines]
    seconds = sum(
        (b - a) / line["rows_per_s"] for a, b, line in zip(rows[:-1], rows[1:], lines[1:], strict=True)
    )
    return (rows[-1] - rows[0]) / seconds


def bench_ddp(store: Store, work: Path, steps: int, batch_size: int, repeats: int) -> dict[str, float]:
    """rows/s of `tide train --nproc 2` against one `tide train` process, 1 thread each, same global batch."""
    import subprocess

    # Windows of several chunks each, so that both ranks read a share of every window.
    (work / "ddp.yaml").write_text(f"window_rows: {32 * batch_size}\nread_threads: 1\nlog_every: 2\n")
    args = [
        sys.executable,
        "-m",
        "tide.cli",
        "train",
        "--store",
        str(store.path),
        "--config",
        str(work / "ddp.yaml"),
    ]
    args += [
        "--layers",
        "0",
        "--batch-size",
        str(batch_size),
        "--max-steps",
        str(steps),
        "--warmup-steps",
        "1",
    ]
    args += ["--checkpoint-every", str(10**6), "--val-fraction", "0", "--device", "cpu", "--no-progress"]
    args += ["--no-eval", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def rate(nproc: int) -> float:
        out = work / f"ddp{nproc}"
        subprocess.run([*args, "--out", str(out), *(["--nproc", "2"] if nproc > 1 else [])], env=env,
                       check=True, capture_output=True)  # fmt: skip
        return _steady_rows_per_s(out / "metrics.jsonl")

    pairs = [(rate(1), rate(2)) for _ in range(repeats)]
    ratios = [two / one for one, two in pairs]
    return {
        "train_ddp_1rank_rows_per_s": statistics.median(one for one, _ in pairs),
        "train_ddp_2ranks_rows_per_s": statistics.median(two for _, two in pairs),
        "train_ddp_scaling": statistics.median(ratios),
        "train_ddp_scaling_min": min(ratios),
        "train_ddp_scaling_max": max(ratios),
    }


def reader_figures(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """The reader at the demo model's width (d = 128) and at DiT-XL's (d = 1152), with the default codec, and
    at d = 1152 with the smaller codec for sharing (blosc-zstd)."""
    figures: dict[str, float] = {}
    cases = [
        ("", 128, args.num_samples, DEFAULT_CODEC),
        ("_d1152", 1152, args.num_samples_d1152, DEFAULT_CODEC),
        ("_d1152_codec_blosc_zstd", 1152, args.num_samples_d1152, "blosc-zstd"),
    ]
    for suffix, d, n, codec in cases:
        path = work / f"reader{suffix}.zarr"
        # Harvest-like chunks: a batch of 10 images at d = 1152 keeps a chunk near the 4 MB target.
        store = synthetic_store(
            path,
            num_samples=n,
            num_steps=50,
            tokens=16,
            d_model=d,
            batch_size=50 if d < 512 else 10,
            values="random",
            codec=codec,
        )
        rates = bench_reader(store, args.batch_size, args.repeats, args.epochs, work)
        if suffix == "_d1152":
            figures |= bench_thread_scaling(store, args.batch_size, args.repeats, args.epochs)
            figures |= bench_raw_scaling(store, args.repeats, args.epochs)
        figures[f"reader_rows_per_s{suffix}"] = rates["rows_per_s"]
        figures[f"reader_memmap_rows_per_s{suffix}"] = rates["memmap_rows_per_s"]
        figures[f"reader_vs_memmap_ratio{suffix}"] = rates["vs_memmap_ratio"]
        figures[f"reader_vs_memmap_cpu_ratio{suffix}"] = rates["vs_memmap_cpu_ratio"]
        shutil.rmtree(path)
    return figures


def bench_s3(
    store: Store, batch_size: int, repeats: int = 3, separate_process: bool = True
) -> dict[str, float]:
    """Shuffled epochs of ActivationLoader from a moto S3 server on 127.0.0.1 against the same epochs from the
    local folder, alternating, as a median of ratios; and the server's own ceiling: the same chunk objects
    fetched with nothing of tide's (obstore, 32 GETs in flight, no decoding), so that the ratio can be read
    against what the server can serve at all. moto is a Python server on the same cores as the reader, so
    on a small machine that ceiling, not tide, is the limit (docs/benchmarks.md, "Reading from an object
    store"). Beside the rates, CPU-µs per row of each side and of the server (a process of its own), and
    `reader_s3_vs_server_cpu_bound`: the ratio the CPU they cost allows when they share the same cores."""
    import boto3
    from moto.server import ThreadedMotoServer
    from tide.train.fit.data import ActivationLoader

    from tests.test_remote import upload

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    if separate_process:
        server, endpoint = _moto_process()
    else:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
    env["AWS_ENDPOINT_URL"] = endpoint
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket="tide-bench")
        remote = open_store(upload(Path(store.path), "s3://tide-bench/r.zarr"))
        name = store.meta.act_names()[0]

        def rate(s: Store) -> Rate:
            loader = ActivationLoader(s, [name], s.done_chunks(), batch_size, seed=0)
            return _timed(lambda: sum(len(b.t_B) for b in loader.batches(epochs=1)))

        def served(run: Callable[[], Rate]) -> tuple[Rate, float]:
            """run()'s rate and the server's CPU-µs per row meanwhile (nan when it runs in this process)."""
            before = _cpu_s(server.pid) if separate_process else math.nan
            r = run()
            after = _cpu_s(server.pid) if separate_process else math.nan
            return r, (after - before) / r.rows * 1e6

        rate(store)  # warm the page cache
        local, s3, raw = [], [], []
        for _ in range(repeats):
            local.append(rate(store))
            s3.append(served(lambda: rate(remote)))
            raw.append(served(lambda: _timed(lambda: _raw_get(remote, name))))
    finally:
        if separate_process:
            server.terminate()
            server.wait()
        else:
            server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "reader_s3_rows_per_s": statistics.median(r.rows_per_s for r, _ in s3),
        "s3_server_raw_get_rows_per_s": statistics.median(r.rows_per_s for r, _ in raw),
        "reader_s3_vs_local_ratio": statistics.median(
            a.rows_per_s / b.rows_per_s for (a, _), b in zip(s3, local, strict=True)
        ),
        "reader_s3_vs_server_ratio": statistics.median(
            a.rows_per_s / b.rows_per_s for (a, _), (b, _) in zip(s3, raw, strict=True)
        ),
        # CPU-µs per row, which load from other processes barely changes: the reader's (this process: fetching,
        # checking, scattering), the plain GETs', the local folder's, and moto's while serving each.
        "reader_s3_cpu_us_per_row": statistics.median(r.cpu_us_per_row for r, _ in s3),
        "reader_local_cpu_us_per_row": statistics.median(r.cpu_us_per_row for r in local),
        "s3_raw_get_cpu_us_per_row": statistics.median(r.cpu_us_per_row for r, _ in raw),
        "s3_server_cpu_us_per_row_reader": statistics.median(c for _, c in s3),
        "s3_server_cpu_us_per_row_raw_get": statistics.median(c for _, c in raw),
        # The ratio reachable when client and server share the same cores and keep them busy: the CPU a row
        # costs both sides with plain GETs over what it costs them with the reader.
        "reader_s3_vs_server_cpu_bound": statistics.median(
            (b.cpu_us_per_row + bc) / (a.cpu_us_per_row + ac)
            for (a, ac), (b, bc) in zip(s3, raw, strict=True)
        ),
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _moto_process():
    """(a moto S3 server in a process of its own on a free port of 127.0.0.1, its endpoint URL)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return server, endpoint
        except OSError:
            time.sleep(0.05)
    server.terminate()
    raise RuntimeError(f"moto's server did not start on port {port}")


def _raw_get(remote: Store, name: str, in_flight: int = 32) -> int:
    """Plain GETs of every chunk object of array `name` (what the server can serve); the rows they hold."""
    import asyncio

    import obstore

    inner = remote.root.store.store  # the obstore S3Store under zarr's ObjectStore
    arr = remote.root[name]
    keys = [f"{name}/{arr.metadata.encode_chunk_key(c)}" for c in np.ndindex(*arr.cdata_shape)]

    async def fetch_all() -> None:
        gate = asyncio.Semaphore(in_flight)

        async def one(key: str) -> None:
            async with gate:
                await (await obstore.get_async(inner, key)).bytes_async()

        await asyncio.gather(*(one(k) for k in keys))

    asyncio.run(fetch_all())
    return arr.shape[0] * arr.shape[1] * arr.shape[2]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-samples", type=int, default=2000, help="Samples of the d = 128 store (x 50 steps x 16 tokens)."
    )
    parser.add_argument("--num-samples-d1152", type=int, default=400, help="Samples of the d = 1152 stores.")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs each reader rate is measured over.")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ddp-steps", type=int, default=40, help="Optimiser steps of each train_ddp run.")
    parser.add_argument(
        "--read-threads", type=int, default=None, help="Read threads (default one per core, as tide train)."
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (see the module docstring)."
    )
    # tests/bench.py calls main() with no arguments under its own command line: defaults, not its flags.
    args = parser.parse_args(argv or [])
    read_threads = args.read_threads or default_read_threads()
    configure_read_threads(read_threads)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        figures = reader_figures(args, work)
        store = synthetic_store(
            work / "train.zarr",
            num_samples=min(args.num_samples, 400),
            num_steps=50,
            tokens=16,
            d_model=128,
            batch_size=50,
            values="random",
        )
        figures |= bench_train(store, work, args.train_steps, args.batch_size, args.repeats)
        figures |= bench_ddp(store, work, args.ddp_steps, args.batch_size, min(args.repeats, 3))
        figures |= bench_s3(store, args.batch_size, repeats=min(args.repeats, 3))
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"torch_threads: {torch.get_num_threads()}")
    print(f"read_threads: {read_threads}")
    for key, value in figures.items():
        print(f"{key}: {value:.3f}" if "ratio" in key else f"{key}: {value:.4g}", flush=True)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
