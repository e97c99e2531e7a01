"""Training: normalisation, schedule, SAE specs, exact resume after SIGKILL, and the errors of `tide train`."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tide.cli import app
from tide.train.fit.checkpoint import load_sae, load_state
from tide.train.fit.config import TrainConfig
from tide.train.fit.trainer import lr_at, train
from typer.testing import CliRunner

from tests.factories import random_store, train_config

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """16 samples x 6 steps x 8 tokens x D 16, two layers, random rows whose mean and scale vary with the step."""
    return random_store(
        tmp_path_factory.mktemp("train") / "s.zarr", num_steps=6, layers=(0, 2), steps_per_chunk=3
    )


def _cfg(store, out, **kw) -> TrainConfig:
    base = dict(
        archs=("tide", "topk"), layers="2", k=(4,), expansion=4, batch_size=64, max_steps=6, warmup_steps=2,
        val_fraction=0.25, window_rows=256, device="cpu",
    )  # fmt: skip
    return train_config(store.path, out, **(base | kw))


def test_normalisation_round_trip(store, tmp_path):
    cfg = _cfg(store, tmp_path / "o", steps="1:5")
    result = train(cfg, log=lambda m: None)
    loaded = load_sae(result.saes[0])
    sae, meta = loaded.sae, loaded.meta
    assert meta.step_range == (1, 5) and meta.store.identity == store.identity() and meta.split.val_chunks
    # The stored normalisation is the training rows' per-step mean and the scalar that makes E||x_n||^2 = D.
    x = store.root["resid_l02"][:].astype(np.float64)  # (N, S, T, D)
    train_samples = np.concatenate([np.arange(c * 4, c * 4 + 4) for c in meta.split.train_chunks])
    xs = x[train_samples][:, 1:5]
    mean_SD = xs.mean(axis=(0, 2))
    np.testing.assert_allclose(sae.input_mean.numpy(), mean_SD, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.input_mean_t.numpy(), store.timesteps[1:5])
    centred = xs - mean_SD[None, :, None]
    assert math.isclose((centred**2).sum(-1).mean() / float(sae.input_scale) ** 2, 16, rel_tol=1e-4)
    # forward_raw on raw rows = the SAE on the trainer's normalised rows, de-normalised.
    rows = torch.as_tensor(x[0, 1:5].reshape(-1, 16), dtype=torch.float32)
    step = torch.arange(1, 5).repeat_interleave(8)
    t = torch.as_tensor(store.timesteps, dtype=torch.float32)[step]
    x_n = (rows - torch.as_tensor(mean_SD, dtype=torch.float32)[step - 1]) / sae.input_scale
    with torch.no_grad():
        want = (
            sae(x_n, t).x_hat_BD * sae.input_scale + torch.as_tensor(mean_SD, dtype=torch.float32)[step - 1]
        )
        got = sae.forward_raw(rows, t).x_hat_BD
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lr_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=110)
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    lin = TrainConfig(lr=1.0, warmup_steps=0, decay="linear", min_lr_ratio=0, max_steps=11)
    assert lr_at(5, lin, 11) == pytest.approx(0.5)


def test_specs_cover_layers_archs_and_ks(store):
    cfg = TrainConfig(layers="all", archs="tide,topk,relu", k="4,8", expansion=2)
    names = [s.name for s in cfg.specs(store.meta)]
    assert names == [
        "resid_l00-tide-k4",
        "resid_l00-tide-k8",
        "resid_l00-topk-k4",
        "resid_l00-topk-k8",
        "resid_l00-relu",
        "resid_l02-tide-k4",
        "resid_l02-tide-k8",
        "resid_l02-topk-k4",
        "resid_l02-topk-k8",
        "resid_l02-relu",
    ]
    assert {s.sae.num_latents for s in cfg.specs(store.meta)} == {32}
    middle = [s.array for s in TrainConfig().specs(store.meta)]
    assert middle == ["resid_l02", "resid_l02"]  # the middle of the stored layers [0, 2]


def _train_cmd(store, out):
    args = [
        "train",
        "--store",
        str(store),
        "--out",
        str(out),
        "--layers",
        "0",
        "--k",
        "4",
        "--expansion",
        "4",
        "--batch-size",
        "32",
        "--max-steps",
        "400",
        "--warmup-steps",
        "5",
        "--checkpoint-every",
        "10",
        "--device",
        "cpu",
        "--no-progress",
        "--no-eval",
    ]
    return [sys.executable, "-c", "from tide.cli import app; app()", *args]


def test_kill_and_resume_equals_uninterrupted(store, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        _train_cmd(store.path, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (killed / "trainer_state.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = load_state(killed, torch.device("cpu"))
    assert 0 < state["step"] < 400, "the kill must land mid-run"

    resumed = subprocess.run(_train_cmd(store.path, killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {state['step']}" in resumed.stderr
    subprocess.run(_train_cmd(store.path, clean), env=env, capture_output=True, check=True)
    for name in ("resid_l00-tide-k4", "resid_l00-topk-k4"):
        a, b = (
            load_file(str(killed / name / "sae.safetensors")),
            load_file(str(clean / name / "sae.safetensors")),
        )
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}/{key}")
    steps = [line.split(",")[0] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [line.split(",")[0] for line in (clean / "metrics.jsonl").read_text().splitlines()]


def _fails(args, *needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.output, result.output


def test_bad_inputs_are_one_paragraph_errors(store, tmp_path):
    out = str(tmp_path / "o")
    base = [
        "train",
        "--store",
        str(store.path),
        "--out",
        out,
        "--no-progress",
        "--max-steps",
        "3",
        "--warmup-steps",
        "1",
        "--batch-size",
        "64",
        "--k",
        "4",
    ]
    _fails(["train", "--store", str(tmp_path), "--out", out], "not a Zarr v3 store")
    _fails(["train", "--store", str(tmp_path / "nope.zarr"), "--out", out], "does not exist", "tide harvest")
    _fails([*base, "--layers", "1"], "layer(s) [1] are not in the store", "holds layers [0, 2]")
    _fails([*base, "--site", "mlp"], "site 'mlp' is not in the store", "holds sites ['resid']")
    _fails(
        [*base, "--k", "100", "--expansion", "2"],
        "k=[100] exceeds the SAE width num_latents=32",
        "--expansion",
    )
    _fails([*base, "--arch", "tide,gated"], "--arch[1]: got 'gated'")
    assert runner.invoke(app, [*base, "--no-eval"]).exit_code == 0
    other = random_store(tmp_path / "other.zarr", num_steps=6, layers=(0, 2), seed=1)
    _fails([*base[:2], str(other.path), *base[3:]], "trained on the store", "--overwrite")
    _fails([*base, "--lr", "0.5"], "different configuration", "lr: 0.001")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    _fails([*base[:4], str(tmp_path / "junk"), *base[5:]], "is not a tide training run", "holds notes.txt")


def test_config_file_with_flag_overrides(store, tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("k: [4]\nexpansion: 2\nbatch_size: 64\nmax_steps: 5\nwarmup_steps: 1\narchs: topk\n")
    out = tmp_path / "o"
    args = ["train", "--config", str(cfg_file), "--store", str(store.path), "--out", str(out)]
    args += ["--max-steps", "3", "--no-progress", "--no-eval"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = load_sae(out / "resid_l02-topk-k4").meta
    assert meta.trained_steps == 3 and meta.sae.num_latents == 32 and meta.train_config["archs"] == ["topk"]
    again = runner.invoke(app, args)  # the same command again
    assert again.exit_code == 0 and "resuming at step 3" in again.output  # finished: nothing left to train
