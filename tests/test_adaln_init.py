"""`tide train --init-modulation adaln`: tide SAEs start from the DiT's adaLN that reads their layer.

References are computed from the DiT's own submodules (AdaLayerNormZero's forward, the output layer's code),
loaded independently of train/sae/adaln.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tide.cli import app
from tide.store.reader import open_store
from tide.train.fit.checkpoint import load_sae
from tide.train.fit.config import TrainConfig
from tide.train.fit.trainer import TrainError, train
from typer.testing import CliRunner

from tests.factories import harvested, train_config

runner = CliRunner()
T = torch.tensor([999.0, 640.5, 250.0, 3.0])


@pytest.fixture(scope="module")
def dit(tiny_dit, tmp_path_factory):
    """(model folder, store): a private copy of the tiny DiT (tests move it) and a store of both CFG branches."""
    root = tmp_path_factory.mktemp("adaln")
    model = shutil.copytree(tiny_dit, root / "model")
    store = harvested(
        model, root / "s.zarr", num_samples=8, num_steps=4, sites="resid,attn", cfg_branch="both",
        token_fraction=0.5,
    )  # fmt: skip
    return model, store


def _train(store, out, **kw):
    # lr 1e-9: one AdamW step moves every weight by ~1e-9, so the saved SAE holds its initial modulation.
    base = dict(
        archs=("tide",), init_modulation="adaln", max_steps=1, warmup_steps=0, lr=1e-9, val_fraction=0.25,
        window_rows=64, device="cpu",
    )  # fmt: skip
    logs = []
    result = train(train_config(store, out, **(base | kw)), log=logs.append)
    return [load_sae(p) for p in result.saes], logs


def _dit(model):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(model / "transformer", torch_dtype=torch.float32).eval()


def _train_labels(store, meta):
    st = open_store(store)
    label_N = st.root["label"][:]
    return torch.as_tensor(
        np.concatenate([label_N[st.layout.sample_chunk(c)] for c in meta.split.train_chunks])
    )


def _assert_modulation(sae, shift, scale):
    with torch.no_grad():
        got = sae.modulation(T)
    torch.testing.assert_close(got.shift_BD, shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.scale_BD, scale, rtol=1e-4, atol=1e-5)


def test_uncond_resid_equals_next_blocks_adaln_forward(dit, tmp_path):
    model, store = dit
    (loaded,), logs = _train(store, tmp_path / "o", layers="0", branch="uncond")
    assert "block 1's (shift_msa, scale_msa)" in logs[0]
    norm1 = _dit(model).transformer_blocks[1].norm1  # AdaLayerNormZero: LayerNorm(x) * (1 + scale) + shift
    null = torch.full((len(T),), norm1.emb.class_embedder.num_classes)
    x = torch.randn(len(T), 1, 16)
    with torch.no_grad():
        shift = norm1(torch.zeros_like(x), T, null, hidden_dtype=torch.float32)[0][:, 0]  # LayerNorm(0) = 0
        ln = torch.nn.functional.layer_norm(x, (16,), eps=1e-6)
        scale = ((norm1(x, T, null, hidden_dtype=torch.float32)[0] - shift[:, None]) / ln - 1)[:, 0]
    _assert_modulation(loaded.sae, shift, scale)


def test_cond_attn_and_last_layer(dit, tmp_path):
    model, store = dit
    saes, logs = _train(store, tmp_path / "o", layers="0,2", site="attn")
    assert "block 0's (shift_mlp, scale_mlp)" in logs[0] and "block 2's (shift_mlp, scale_mlp)" in logs[1]
    dit_, silu = _dit(model), torch.nn.functional.silu
    for loaded, layer in zip(saes, (0, 2), strict=True):
        emb, linear = dit_.transformer_blocks[layer].norm1.emb, dit_.transformer_blocks[layer].norm1.linear
        labels = _train_labels(store, loaded.meta)
        with torch.no_grad():  # the cond branch folds in the mean class embedding of the training labels
            cond = emb.timestep_embedder(emb.time_proj(T)) + emb.class_embedder(labels).mean(0)
            _, _, _, shift_mlp, scale_mlp, _ = linear(silu(cond)).chunk(6, dim=1)
        _assert_modulation(loaded.sae, shift_mlp, scale_mlp)

    (last,), logs = _train(store, tmp_path / "r", layers="2", branch="uncond")
    assert "output layer" in logs[0]  # block 2 is the last: DiT's norm_out + proj_out_1 read its output
    with torch.no_grad():  # the output adaLN of DiTTransformer2DModel.forward, null label
        conditioning = dit_.transformer_blocks[0].norm1.emb(
            T, torch.full((len(T),), 4), hidden_dtype=torch.float32
        )
        shift, scale = dit_.proj_out_1(silu(conditioning)).chunk(2, dim=1)
    _assert_modulation(last.sae, shift, scale)


def test_zero_init_is_the_default(dit, tmp_path):
    _, store = dit
    (loaded,), _ = _train(store, tmp_path / "o", init_modulation="zero")
    with torch.no_grad():
        m = loaded.sae.modulation(T)
    assert m.shift_BD.abs().max() < 1e-6 and m.scale_BD.abs().max() < 1e-6
    assert TrainConfig().init_modulation == "zero"


def _fails(args, *needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.output, result.output


def _args(store, out):
    return [
        "train",
        "--store",
        str(store),
        "--out",
        str(out),
        "--arch",
        "tide",
        "--init-modulation",
        "adaln",
        "--k",
        "2",
        "--expansion",
        "2",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--warmup-steps",
        "1",
        "--no-progress",
        "--no-eval",
    ]


def test_moved_model_is_a_clear_error_but_a_resume_does_not_need_it(dit, tmp_path):
    model, store = dit
    done = runner.invoke(app, _args(store, tmp_path / "done"))
    assert done.exit_code == 0 and "modulation initialised from DiTTransformer2DModel block" in done.output
    moved = model.with_name("moved")
    model.rename(moved)
    try:
        _fails(_args(store, tmp_path / "o"), f"{model / 'transformer'}", "--init-modulation zero", "moved")
        again = runner.invoke(app, _args(store, tmp_path / "done"))
        assert again.exit_code == 0 and "resuming at step 2" in again.output
    finally:
        moved.rename(model)


def test_other_errors(dit, tiny_pixart, tmp_path):
    _, store = dit
    _fails([*_args(store, tmp_path / "a"), "--arch", "topk"], "init_modulation='adaln'", "arch=['topk']")
    _fails([*_args(store, tmp_path / "b"), "--init-modulation", "dit"], "--init-modulation: got 'dit'")
    pixart = harvested(
        tiny_pixart, tmp_path / "p.zarr", num_samples=2, num_steps=2, batch_size=1,
        prompts=tiny_pixart / "prompts.txt", prompt_embeds=tiny_pixart / "embeds.safetensors", guidance_scale=1.0,
    )  # fmt: skip
    with pytest.raises(
        TrainError, match="PixArtTransformer2DModel has no adaLN-zero blocks.*ada_norm_single"
    ):
        _train(pixart, tmp_path / "c", val_fraction=0.5, batch_size=8)
