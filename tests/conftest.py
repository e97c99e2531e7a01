"""Shared fixtures: tiny diffusers pipelines built from config, saved with save_pretrained."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

BUCKET = "tide-test"
"""The bucket of the `s3` fixture's server."""


def save_tiny_dit(
    folder: Path, *, scheduler: str = "DDPMScheduler", learned_sigma: bool = False, seed: int = 0
) -> Path:
    from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2 if learned_sigma else 1,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=4,
    )
    # diffusers zero-initialises the adaLN gates, which would make every block the identity; randomise them.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    model.save_pretrained(folder / "transformer")
    sched = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}[scheduler](
        num_train_timesteps=1000
    )
    sched.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DiTPipeline",
                "transformer": ["diffusers", "DiTTransformer2DModel"],
                "scheduler": ["diffusers", scheduler],
                "tide_default_guidance_scale": 2.0,
            }
        )
    )
    return folder


def save_tiny_pixart(folder: Path, seed: int = 0) -> Path:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_num_groups=1,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    model.save_pretrained(folder / "transformer")
    DPMSolverMultistepScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "PixArtAlphaPipeline",
                "transformer": ["diffusers", "PixArtTransformer2DModel"],
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            }
        )
    )
    return folder


def save_prompt_files(
    folder: Path, num_prompts: int = 3, seq: int = 6, channels: int = 32, seed: int = 0
) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(num_prompts)) + "\n")
    mask = torch.ones(num_prompts, seq, dtype=torch.long)
    mask[:, -2:] = 0
    embeds = folder / "embeds.safetensors"
    save_file(
        {
            "prompt_embeds": torch.randn(num_prompts, seq, channels, generator=g),
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": torch.randn(1, seq, channels, generator=g),
            "negative_prompt_attention_mask": torch.ones(1, seq, dtype=torch.long),
        },
        str(embeds),
    )
    return prompts, embeds


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory) -> Path:
    return save_tiny_dit(tmp_path_factory.mktemp("tiny-dit"))


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory) -> Path:
    folder = save_tiny_pixart(tmp_path_factory.mktemp("tiny-pixart"))
    save_prompt_files(folder)
    return folder


def kill_harvest_mid_run(cmd: list[str], env: dict[str, str], done: Callable[[], object]):
    """Start the harvest `cmd`, SIGKILL it once some but not all samples are done (`done()` reads the store's
    `done` flags, None before it exists), and return the flags it left."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        flags = done()
        if flags is not None and 0 < flags.sum() < len(flags) - 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = done()
    assert 0 < partial.sum() < len(partial), "the kill must land mid-run"
    return partial


def start_moto(port: int = 0):
    """A moto S3 server on 127.0.0.1:`port` (0: a free one), started. Its buckets are this process's moto
    state, which every server started here shares: stopping one loses nothing, and one started again on the
    same port serves what the last one held."""
    moto_server = pytest.importorskip("moto.server")

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def moto_env(server) -> dict[str, str]:
    """The AWS_* variables that point boto3 and obstore at the moto `server`, with credentials it accepts."""
    host, port = server.get_host_and_port()
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; AWS_* point at it for the module. Yields the env."""
    server = start_moto()
    import boto3

    env = moto_env(server)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # Every moto server of this process shares one backend: start each module from an empty one, or a key
    # another module wrote (both test_remote and test_cluster_s3 kill a harvest into killed.zarr) is there.
    urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="session")
def dask_client():
    """A dask Client of a local cluster of 2 single-threaded worker processes, shared by the session's tests."""
    from distributed import Client, LocalCluster

    # Worker processes inherit os.environ (PYTHONPATH included), so they import this checkout's tide.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c
