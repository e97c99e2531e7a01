"""SAELens interop (train/sae/export.py): what `tide export` writes is loaded by sae-lens' own
`SAE.load_from_disk` and reconstructs as tide's forward_raw does; `tide import` brings it back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tide.cli import app
from tide.train.analysis.eval import evaluate_folders
from tide.train.fit.checkpoint import load_sae, save_sae
from tide.train.fit.trainer import train
from tide.train.sae.export import export_saelens, import_saelens
from typer.testing import CliRunner

from tests.factories import random_store, train_config

runner = CliRunner()
ARCHS = ("topk", "batchtopk", "relu", "jumprelu", "tide", "matryoshka")
STEP = 2
"""The stored step exported at."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    store = random_store(tmp / "s.zarr")
    cfg = train_config(
        store.path, tmp / "saes", layers="0", archs=ARCHS, k=(4,), batch_size=64, max_steps=8, warmup_steps=0,
        val_fraction=0.25, jumprelu_init_threshold=0.5,
    )  # fmt: skip
    folders = dict(zip(ARCHS, train(cfg, log=lambda m: None).saes, strict=True))
    with torch.no_grad():  # a tide SAE with a visible modulation, so folding it is really tested
        tide = load_sae(folders["tide"])
        state = tide.sae.state_dict()
        g = torch.Generator().manual_seed(0)
        for name in ("modulation.linear.weight", "modulation.linear.bias"):
            state[name] = 0.1 * torch.randn(state[name].shape, generator=g)
        tide.sae.load_state_dict(state)
        save_sae(folders["tide"], tide.sae, tide.meta)
    return store, folders, tmp


def _rows(store, loaded, step: int) -> tuple[torch.Tensor, float]:
    """Held-out rows of one stored step, raw, and that step's timestep."""
    val = [i for a, b in loaded.meta.split.val_samples(store.layout) for i in range(a, b)]
    x = store.root["resid_l00"][:].astype(np.float32)[val][:, step]  # (n, T, D)
    return torch.as_tensor(x.reshape(-1, x.shape[-1])), float(store.timesteps[step])


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_the_export_and_reconstructs_like_forward_raw(trained, arch):
    from sae_lens import SAE as SaeLensSAE

    store, folders, tmp = trained
    out = tmp / f"saelens-{arch}"
    loaded = load_sae(folders[arch])
    x_BD, t = _rows(store, loaded, STEP)
    result = export_saelens(folders[arch], out, timestep=t)
    sl = SaeLensSAE.load_from_disk(str(out))
    want = {"topk": "topk", "tide": "topk", "relu": "standard", "matryoshka": "jumprelu"}.get(
        arch, "jumprelu"
    )
    assert result.architecture == sl.cfg.architecture() == want
    assert sl.cfg.metadata.hook_name == "resid_l00" and sl.cfg.metadata.model_name == "synthetic"
    assert sl.cfg.metadata.tide_timestep == t
    with torch.no_grad():
        ref = loaded.sae.forward_raw(x_BD, t)
        z_BF = sl.encode(x_BD)
        x_hat_BD = sl.decode(z_BF)
    assert (ref.z_BF > 0).sum() > 0  # something fires: the comparison is not of zeros
    torch.testing.assert_close(z_BF, ref.z_BF, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_hat_BD, ref.x_hat_BD, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sl(x_BD), ref.x_hat_BD, rtol=1e-4, atol=1e-4)


def test_per_timestep_sae_without_timestep_is_refused_with_the_reason(trained):
    _, folders, tmp = trained
    result = runner.invoke(app, ["export", str(folders["tide"]), "--out", str(tmp / "x")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "timestep modulation has no SAELens counterpart" in result.output and "--timestep" in result.output
    result = runner.invoke(app, ["export", str(folders["topk"]), "--out", str(tmp / "x")])
    assert "one mean per timestep (4 of them)" in result.output
    result = runner.invoke(
        app, ["export", str(folders["topk"]), "--out", str(tmp / "x"), "--timestep", "5000"]
    )
    assert result.exit_code == 2 and "trained on scheduler timesteps" in result.output
    assert not (tmp / "x").exists()


def test_import_round_trip(trained):
    store, folders, tmp = trained
    loaded = load_sae(folders["jumprelu"])
    x_BD, t = _rows(store, loaded, STEP)
    first = tmp / "rt-saelens"
    result = runner.invoke(
        app, ["export", str(folders["jumprelu"]), "--out", str(first), "--timestep", str(t)]
    )
    assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="tide import"):
        load_sae(first)
    result = runner.invoke(
        app, ["import", str(first), "--store", str(store.path), "--out", str(tmp / "rt-tide")]
    )
    assert result.exit_code == 0, result.output
    back = load_sae(tmp / "rt-tide")
    assert back.meta.array == "resid_l00" and back.meta.split == loaded.meta.split  # the export's split
    with torch.no_grad():
        torch.testing.assert_close(
            back.sae.forward_raw(x_BD, t).x_hat_BD, loaded.sae.forward_raw(x_BD, t).x_hat_BD
        )
        torch.testing.assert_close(back.sae.forward_raw(x_BD).z_BF, loaded.sae.forward_raw(x_BD, t).z_BF)
    # An imported SAE works on raw rows at any t, so it exports with no timestep, to the same weights.
    export_saelens(tmp / "rt-tide", tmp / "rt-again")
    a, b = (
        load_file(str(first / "sae_weights.safetensors")),
        load_file(str(tmp / "rt-again/sae_weights.safetensors")),
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6)
    (res,) = evaluate_folders([tmp / "rt-tide"])  # tide eval reads it, on the held-out samples
    assert res.overall.rows == x_BD.shape[0] * store.layout.num_steps


def test_import_of_a_foreign_saelens_folder(trained, tmp_path):
    """A folder SAELens wrote itself (not through tide): encode x without b_dec, default held-out samples."""
    store, _, _ = trained
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    D, F = 16, 24
    w = {
        "W_enc": torch.randn(D, F, generator=g),
        "W_dec": torch.randn(F, D, generator=g),
        "b_enc": torch.randn(F, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
    }
    cfg["metadata"] = {"sae_lens_version": "6.5.0", "hook_name": "blocks.3.hook_resid_post"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hook_name 'blocks.3.hook_resid_post' is not an array"):
        import_saelens(tmp_path, store.path, tmp_path / "t")
    import_saelens(tmp_path, store.path, tmp_path / "t", array="resid_l00")
    back = load_sae(tmp_path / "t")
    x_BD = torch.randn(10, D, generator=g)
    z_BF = torch.relu(x_BD @ w["W_enc"] + w["b_enc"])  # SAELens' standard SAE, written out
    with torch.no_grad():
        torch.testing.assert_close(back.sae.forward_raw(x_BD).x_hat_BD, z_BF @ w["W_dec"] + w["b_dec"])
    assert back.meta.split.val_chunks == store.done_chunks() and back.meta.split.train_chunks == []
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        import_saelens(tmp_path, store.path, tmp_path / "t2", array="resid_l00")
