"""Held-out evaluation (train/analysis/eval.py) against a plain numpy computation, `tide train` + `tide eval` end
to end, and the texts of the table and the progress bar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tide.cli import app
from tide.train.analysis.eval import EvalResult, Group, Metrics, evaluate_folders, format_table, progress_text
from tide.train.fit.checkpoint import load_sae
from typer.testing import CliRunner

from tests.factories import harvested, random_store, synthetic_store, trained

runner = CliRunner()


def _numpy_metrics(x, x_hat, z, dense_threshold=0.1):
    """The definitions of train/analysis/eval.py, written out plainly over one group of rows."""
    n, d = x.shape
    r = x - x_hat
    cos = (x * x_hat).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1), 1e-12)
    fires = (z > 0).sum(0)
    return {
        "rows": n,
        "mse": (r**2).mean(),
        "fvu": (r**2).sum() / ((x - x.mean(0)) ** 2).sum(),
        "explained_variance": 1 - r.var(0).sum() / x.var(0).sum(),
        "cosine": cos.mean(),
        "l0": (z > 0).sum(1).mean(),
        "dead_fraction": (fires == 0).mean(),
        "dense_fraction": (fires > dense_threshold * n).mean(),
    }


def test_metrics_equal_a_numpy_computation(tmp_path):
    store = random_store(tmp_path / "s.zarr", num_steps=6, steps_per_chunk=4)
    folders = trained(
        store.path, tmp_path / "o", layers="0", archs=("tide", "batchtopk"), k=(3,), batch_size=64, max_steps=8,
        val_fraction=0.25, steps="1:6",
    )  # fmt: skip
    results = evaluate_folders(folders, batch_size=50, buckets=2)
    x_all = store.root["resid_l00"][:].astype(np.float32)
    for folder, res in zip(folders, results, strict=True):
        loaded = load_sae(folder)
        val = [i for a, b in loaded.meta.split.val_samples(store.layout) for i in range(a, b)]
        x = torch.as_tensor(x_all[val][:, 1:6])  # (n, S, T, D)
        t = torch.as_tensor(store.timesteps[1:6], dtype=torch.float32)[None, :, None].expand(x.shape[:3])
        with torch.no_grad():
            out = loaded.sae.forward_raw(x.reshape(-1, 16), t.reshape(-1))
        x_hat = out.x_hat_BD.double().numpy().reshape(*x.shape)
        z = out.z_BF.numpy().reshape(*x.shape[:3], -1)
        xs = x.double().numpy()

        groups = [(res.overall, range(1, 6))] + [
            (g.metrics, range(*g.steps)) for g in res.buckets + res.per_step
        ]
        assert [g.steps for g in res.buckets] == [(1, 4), (4, 6)] and len(res.per_step) == 5
        for got, steps in groups:
            s = [i - 1 for i in steps]  # stored steps 1..5 are columns 0..4
            want = _numpy_metrics(
                xs[:, s].reshape(-1, 16), x_hat[:, s].reshape(-1, 16), z[:, s].reshape(-1, z.shape[-1])
            )
            for key, value in want.items():
                assert getattr(got, key) == pytest.approx(value, rel=1e-6, abs=1e-9), (
                    folder.name,
                    list(steps),
                    key,
                )
        per_step = [
            _numpy_metrics(
                x_hat=x_hat[:, s].reshape(-1, 16),
                x=xs[:, s].reshape(-1, 16),
                z=z[:, s].reshape(-1, z.shape[-1]),
            )
            for s in range(5)
        ]
        for key in ("fvu", "explained_variance", "l0", "dead_fraction"):  # the table's `step mean` line
            want = np.mean([m[key] for m in per_step])
            assert getattr(res.step_mean, key) == pytest.approx(want, rel=1e-6, abs=1e-9), key
        # Why `step mean` shows more dead latents than any bucket: a latent dead in a group is dead in each of
        # its steps, so a single step has at least as many dead as its bucket, and a bucket as many as all rows.
        for g in res.buckets:
            steps_dead = [res.per_step[s - 1].metrics.dead_fraction for s in range(*g.steps)]
            assert min(steps_dead) >= g.metrics.dead_fraction >= res.overall.dead_fraction
        saved = json.loads((folder / "eval_b2.json").read_text())  # 2 buckets: not the default eval.json
        assert saved["overall"]["fvu"] == pytest.approx(res.overall.fvu)
        assert saved["step_mean"]["fvu"] == pytest.approx(res.step_mean.fvu)
        assert not (folder / "eval.json").exists()


@pytest.fixture(scope="module")
def dit_store(tiny_dit, tmp_path_factory):
    out = tmp_path_factory.mktemp("dit") / "s.zarr"
    return harvested(
        tiny_dit, out, num_samples=8, num_steps=6, layers="0,1,2", token_fraction=0.5, guidance_scale=1.0
    )


def _train(store, out, *extra: str):
    """`tide train` of `store` into `out`, 32 rows a step with k=4 after a warm-up of 1; `extra` adds flags."""
    args = ["train", "--store", str(store), "--out", str(out), "--warmup-steps", "1", "--batch-size", "32"]
    return runner.invoke(app, [*args, "--k", "4", "--no-progress", *extra])


def test_tide_train_then_tide_eval(dit_store, tmp_path):
    out = tmp_path / "saes"
    result = _train(dit_store, out, "--max-steps", "4", "--val-fraction", "0.25")
    assert result.exit_code == 0, result.output
    for name in ("resid_l01-tide-k4", "resid_l01-topk-k4"):  # the middle of the stored layers 0, 1, 2
        assert f"{name} (held-out samples" in result.output
        assert (out / name / "eval.json").is_file()
    assert result.output.count("\n   pooled ") == 2 and result.output.count("\nstep mean ") == 2
    report = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(out), "--buckets", "3", "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert [d["name"] for d in data] == ["resid_l01-tide-k4", "resid_l01-topk-k4"]
    assert (
        len(data[0]["buckets"]) == 3
        and len(data[0]["per_step"]) == 6
        and data[0]["overall"]["rows"] == 2 * 6 * 8
    )


def test_eval_errors(dit_store, tmp_path):
    out = tmp_path / "saes"
    assert _train(dit_store, out, "--max-steps", "2", "--arch", "topk", "--no-eval").exit_code == 0
    other = synthetic_store(tmp_path / "other.zarr", d_model=16, layers=(1,))
    result = runner.invoke(app, ["eval", str(out), "--store", str(other.path)])
    assert (
        result.exit_code == 2
        and "was trained on the store" in result.output
        and "Traceback" not in result.output
    )
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "neither an SAE folder" in result.output


def test_same_sae_names_from_two_runs_keep_their_own_results(tmp_path):
    store = random_store(tmp_path / "s.zarr", num_samples=8, d_model=8, batch_size=2)
    folders = []
    for seed in (0, 1):
        folders += trained(store.path, tmp_path / f"run{seed}", max_steps=3, val_fraction=0.25, seed=seed)
    together = evaluate_folders(folders, batch_size=16)
    apart = [evaluate_folders([f], batch_size=16)[0] for f in folders]
    assert together[0].name == together[1].name and together[0].overall != together[1].overall
    assert [r.overall for r in together] == [r.overall for r in apart]


def _metrics(rows: int, fvu: float, l0: float) -> Metrics:
    return Metrics(rows, 0.5 * fvu, fvu, 1 - fvu, 0.9, l0, 0.25, 0.0)


def test_eval_table_shows_pooled_and_step_mean():
    fvus, l0s = [0.10, 0.20, 0.36], [4.0, 5.0, 9.0]
    per_step = [Group((s, s + 1), (900.0 - 400 * s, 900.0 - 400 * s), _metrics(10, f, l0))
                for s, (f, l0) in enumerate(zip(fvus, l0s, strict=True))]  # fmt: skip
    result = EvalResult("x-topk-k2", _metrics(30, 0.1417, 6.0), per_step, per_step)
    lines = format_table(result).splitlines()
    pooled = next(ln for ln in lines if ln.split()[0] == "pooled").split()
    mean = next(ln for ln in lines if ln.startswith("step mean")).split()
    assert pooled[1:4] == ["900..100", "30", "0.1417"]
    assert mean[2:5] == ["900..100", "30", f"{np.mean(fvus):.4f}"] and mean[-3] == f"{np.mean(l0s):.1f}"
    legend = " ".join(lines[-3:])
    for word in (
        "pooled:",
        "step mean:",
        "fvu:",
        "ev:",
        "L0:",
        "dense",
        ">10% of rows",
        "silent at one step",
    ):
        assert word in legend, legend
    assert result.to_json()["step_mean"]["fvu"] == pytest.approx(np.mean(fvus))


def test_progress_text_names_each_sae():
    text = progress_text(["resid_l03-tide-k16", "resid_l03-topk-k16"], [0.1449, 0.155], [16, 15.96])
    assert text == "tide-k16 fvu .145 L0 16.0 | topk-k16 fvu .155 L0 16.0"
    sweep = progress_text(["resid_l01-tide-k16", "resid_l03-tide-k16"], [1.5, 0.2], [3, 4])
    assert sweep == "resid_l01-tide-k16 fvu 1.500 L0 3.0 | resid_l03-tide-k16 fvu .200 L0 4.0"
    assert progress_text(["resid_l03-relu"], [0.3], [12.0]) == "resid_l03-relu fvu .300 L0 12.0"
