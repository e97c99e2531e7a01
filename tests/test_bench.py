"""`make bench` keeps running: every benchmark function, at tiny sizes, prints every figure."""

from __future__ import annotations

import math

from tests import bench

HARVEST = ["harvest_plain_sampling_s", "harvest_wall_s", "harvest_overhead_ratio", "bytes_per_value"]
HARVEST += ["harvest_cluster_scaling", "harvest_cluster_overhead"]
CODECS = [f"codec_{k}_{c}" for k in ("ratio", "read_slowdown") for c in ("none", "blosc_zstd1_shuffle")]
READER = [
    f"reader_{k}{case}"
    for k in ("rows_per_s", "memmap_rows_per_s", "vs_memmap_ratio", "vs_memmap_cpu_ratio")
    for case in ("", "_d1152", "_d1152_codec_blosc_zstd")
]
READER += ["reader_thread_scaling_d1152", "reader_rows_per_s_d1152_1_thread", "reader_thread_cpu_cost_d1152"]
READER += ["reader_raw_thread_scaling_d1152"]
TRAIN = ["train_cache_rows_per_s", "train_memory_rows_per_s", "train_cache_vs_memory_ratio"]
TRAIN += ["reader_s3_rows_per_s", "s3_server_raw_get_rows_per_s", "reader_s3_vs_local_ratio"]
TRAIN += ["reader_s3_vs_server_ratio", "train_ddp_1rank_rows_per_s", "train_ddp_2ranks_rows_per_s"]
TRAIN += ["train_ddp_scaling", "reader_s3_cpu_us_per_row", "s3_raw_get_cpu_us_per_row"]
TRAIN += [
    "s3_server_cpu_us_per_row_reader",
    "s3_server_cpu_us_per_row_raw_get",
    "reader_s3_vs_server_cpu_bound",
]
FEATURES = ["features_reader_rows_per_s", "features_rows_per_s", "features_vs_reader_ratio"]
FEATURES += ["features_vs_sae_encode_ratio"]


def test_bench_prints_every_figure(capsys):
    figures = bench.main(["--quick"])
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    for name in HARVEST + CODECS + READER + TRAIN + FEATURES:
        assert name in printed, f"make bench no longer prints {name}"
        assert math.isfinite(float(printed[name])) and figures[name] > 0, (name, printed[name])
    assert printed["device"] in ("cpu", "cuda")
