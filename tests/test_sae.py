"""SAE models and losses, each checked against a plain reference written out here with explicit torch ops.

Shape key: B batch, D model width, F SAE latents, K kept latents per row, H modulation MLP width.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.torch import load, save
from tide.train.sae.loss import auxk_loss, sae_loss
from tide.train.sae.model import SAE, SAEConfig, build_sae, init_modulation_from_adaln, timestep_embedding

B, D, F, K = 7, 12, 32, 3
ARCHS = ("tide", "topk", "batchtopk", "relu")


def make(arch: str, d: int = D, f: int = F, k: int = K, seed: int = 0, **kw) -> SAE:
    torch.manual_seed(seed)
    return build_sae(SAEConfig(arch=arch, d_model=d, num_latents=f, k=k, **kw))


@torch.no_grad()
def randomize(sae: SAE, seed: int = 1) -> SAE:
    """Every parameter random, biases and tide's zero-initialised last layer included."""
    g = torch.Generator().manual_seed(seed)
    for p in sae.parameters():
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return sae


def ref_topk(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    z_BF = torch.zeros_like(pre_BF)
    for b in range(pre_BF.shape[0]):
        order = sorted(range(pre_BF.shape[1]), key=lambda f: -pre_BF[b, f].item())[:k]
        for f in order:
            z_BF[b, f] = max(pre_BF[b, f].item(), 0.0)
    return z_BF


def ref_modulation(sae: SAE, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.embeddings import get_timestep_embedding

    m = sae.modulation
    emb_BE = get_timestep_embedding(t_B, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    h_BH = emb_BE @ m.linear_1.weight.T + m.linear_1.bias
    h_BH = h_BH * torch.sigmoid(h_BH)
    h_BH = h_BH @ m.linear_2.weight.T + m.linear_2.bias
    h_BH = h_BH * torch.sigmoid(h_BH)
    out = h_BH @ m.linear.weight.T + m.linear.bias
    d = sae.cfg.d_model
    return out[:, :d], out[:, d:]  # shift, scale


# ---- config ------------------------------------------------------------------------------------------
def test_k_greater_than_num_latents_names_both():
    with pytest.raises(ValueError) as info:
        SAEConfig(arch="topk", d_model=D, num_latents=F, k=F + 1)
    assert f"k={F + 1}" in str(info.value) and f"num_latents={F}" in str(info.value)
    SAEConfig(arch="relu", d_model=D, num_latents=F, k=F + 1)  # relu has no k


def test_config_frozen_strict_and_json_roundtrip():
    cfg = SAEConfig(arch="tide", d_model=D, expansion=4, k=K)
    assert cfg.num_latents == 4 * D and cfg.effective_t_hidden == D and cfg.effective_aux_k == D // 2
    assert SAEConfig.model_validate(json.loads(json.dumps(cfg.model_dump()))) == cfg
    with pytest.raises(ValidationError):
        SAEConfig(d_model=D, num_latents=F, bogus=1)
    with pytest.raises(ValidationError):
        cfg.k = 5
    with pytest.raises(ValueError, match="expansion=2 and num_latents=32"):
        SAEConfig(d_model=D, num_latents=F, expansion=2)


@settings(max_examples=25, deadline=None)
@given(t=st.lists(st.floats(0, 999.99), min_size=1, max_size=9), half=st.integers(2, 160))
def test_timestep_embedding_matches_diffusers(t, half):
    from diffusers.models.embeddings import Timesteps

    t_B = torch.tensor(t)
    ref = Timesteps(2 * half, flip_sin_to_cos=True, downscale_freq_shift=1)(t_B)
    torch.testing.assert_close(timestep_embedding(t_B, 2 * half), ref)


# ---- forward vs reference ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 9), d=st.integers(1, 16), f=st.integers(1, 40), data=st.data())
def test_topk_forward_matches_reference(b, d, f, data):
    k = data.draw(st.integers(1, f))
    sae = randomize(make("topk", d=d, f=f, k=k))
    x_BD = torch.randn(b, d, generator=torch.Generator().manual_seed(b * d))
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    z_BF = ref_topk(pre_BF, k)
    out = sae(x_BD)
    torch.testing.assert_close(out.pre_BF, pre_BF)
    torch.testing.assert_close(out.z_BF, z_BF)
    torch.testing.assert_close(out.x_hat_BD, z_BF @ sae.W_dec + sae.b_dec)
    assert out.x_mod_BD is None
    torch.testing.assert_close(sae(x_BD, torch.rand(b) * 999).x_hat_BD, out.x_hat_BD)  # t ignored


def test_tide_forward_matches_reference():
    sae = randomize(make("tide"))
    x_BD, t_B = torch.randn(B, D), torch.rand(B) * 1000
    shift_BD, scale_BD = ref_modulation(sae, t_B)
    x_mod_BD = (x_BD - sae.b_dec) * (1 + scale_BD) + shift_BD
    pre_BF = x_mod_BD @ sae.W_enc + sae.b_enc
    z_BF = ref_topk(pre_BF, K)
    out = sae(x_BD, t_B)
    torch.testing.assert_close(out.x_mod_BD, x_mod_BD)
    torch.testing.assert_close(out.z_BF, z_BF)
    # Decoded to x directly, never un-modulated.
    torch.testing.assert_close(out.x_hat_BD, z_BF @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(sae.encode(x_BD, t_B), z_BF)
    torch.testing.assert_close(sae.decode(z_BF), out.x_hat_BD)
    # A scalar t means the same t for every row.
    torch.testing.assert_close(sae(x_BD, 250.0).x_hat_BD, sae(x_BD, torch.full((B,), 250.0)).x_hat_BD)


def test_zero_init_tide_equals_topk():
    tide, topk = make("tide"), randomize(make("topk"))
    shared = {n: p for n, p in topk.state_dict().items()}
    tide.load_state_dict(shared, strict=False)
    x_BD, t_B = torch.randn(B, D), torch.rand(B) * 1000
    torch.testing.assert_close(tide(x_BD, t_B).x_hat_BD, topk(x_BD).x_hat_BD)
    torch.testing.assert_close(tide(x_BD, t_B).z_BF, topk(x_BD).z_BF)


def test_batchtopk_batch_selection_then_threshold():
    sae = randomize(make("batchtopk", threshold_ema=0.9))
    x_BD = torch.randn(B, D)
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = pre_BF.clamp_min(0).flatten().tolist()
    keep = sorted(range(len(flat)), key=lambda i: -flat[i])[: K * B]
    z_ref = torch.zeros(B * F)
    z_ref[keep] = torch.tensor([flat[i] for i in keep])
    out = sae(x_BD)  # training mode: top K*B over the whole batch
    torch.testing.assert_close(out.z_BF, z_ref.view(B, F))
    low = min(flat[i] for i in keep if flat[i] > 0)
    assert sae.threshold.item() == pytest.approx(low)  # first batch sets it
    x2_BD = torch.randn(B, D)
    pre2 = ((x2_BD - sae.b_dec) @ sae.W_enc + sae.b_enc).clamp_min(0).flatten()
    low2 = pre2.topk(K * B).values.min().item()
    sae(x2_BD)
    assert sae.threshold.item() == pytest.approx(0.9 * low + 0.1 * low2)
    sae.eval()  # inference: every pre-activation above the threshold
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae(x_BD).z_BF, pre_BF * (pre_BF > sae.threshold).float())
    with pytest.raises(ValueError, match="threshold"):
        make("batchtopk").eval()(x_BD)


def test_relu_forward_and_l1():
    sae = randomize(make("relu", l1_coeff=0.01, aux_coeff=0.0))
    x_BD = torch.randn(B, D)
    z_BF = ((x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc).clamp_min(0)
    out = sae(x_BD)
    torch.testing.assert_close(out.z_BF, z_BF)
    torch.testing.assert_close(out.x_hat_BD, z_BF @ sae.W_dec + sae.b_dec)
    loss = sae_loss(sae, x_BD, out)
    row_norm_F = torch.sqrt((sae.W_dec**2).sum(1))
    l1 = sum((z_BF[b] * row_norm_F).sum() for b in range(B)) / B
    fvu = ((out.x_hat_BD - x_BD) ** 2).sum() / ((x_BD - x_BD.mean(0)) ** 2).sum()
    torch.testing.assert_close(loss.l1, l1)
    torch.testing.assert_close(loss.fvu, fvu)
    torch.testing.assert_close(loss.total, fvu + 0.01 * l1)
    torch.testing.assert_close(loss.mse, ((out.x_hat_BD - x_BD) ** 2).mean())


# ---- decoder geometry --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_init_encoder_is_decoder_transpose_with_unit_rows(arch):
    sae = make(arch)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))


def test_project_decoder_grad_and_normalize():
    sae = make("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F, 1) * 3 + 0.1)  # rows off unit norm: projection must not assume it
    sae.W_dec.grad = torch.randn(F, D)
    before = sae.W_dec.grad.clone()
    sae.project_decoder_grad()
    g, w = sae.W_dec.grad, sae.W_dec.detach()
    torch.testing.assert_close((g * w).sum(1), torch.zeros(F), atol=1e-5, rtol=0)
    torch.testing.assert_close(g, before - ((before * w).sum(1) / (w * w).sum(1))[:, None] * w)
    direction = w / w.norm(dim=1, keepdim=True)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    torch.testing.assert_close(sae.W_dec.detach(), direction)


def test_init_decoder_bias_is_geometric_median():
    x_BD = torch.randn(200, D) + 3.0
    x_BD[:5] += 100.0  # outliers drag the mean, not the median
    sae = make("topk")
    sae.init_decoder_bias(x_BD)
    m = sae.b_dec.detach()
    grad_D = ((m - x_BD) / (m - x_BD).norm(dim=1, keepdim=True)).sum(0)  # d/dm sum_i ||x_i - m||
    assert grad_D.norm() < 1e-2 * len(x_BD)
    assert (m - 3.0).abs().max() < 0.5 < (x_BD.mean(0) - 3.0).abs().min()


# ---- dead latents and AuxK ---------------------------------------------------------------------------
def test_dead_latents_and_auxk():
    sae = randomize(make("topk", aux_k=4, dead_steps_threshold=2))
    x_BD = torch.randn(B, D)
    out = sae(x_BD)
    fired = (out.z_BF > 0).any(0)
    assert torch.equal(sae.steps_since_fired, (~fired).long())
    assert not sae.dead_mask().any()
    loss = sae_loss(sae, x_BD, out)
    assert loss.aux.item() == 0.0
    torch.testing.assert_close(loss.total, loss.fvu)

    sae(x_BD)
    out = sae(x_BD)  # the same batch: the same latents fire, the others are now 3 forwards old
    dead = sae.dead_mask()
    assert torch.equal(dead, ~(out.z_BF > 0).any(0)) and dead.sum() >= 4
    loss = sae_loss(sae, x_BD, out)
    e_BD = x_BD - out.x_hat_BD
    masked = torch.where(dead, out.pre_BF, torch.tensor(-math.inf))
    vals, idx = masked.topk(4, dim=1)
    z_aux = torch.zeros(B, F).scatter(1, idx, vals.clamp_min(0))
    ref = ((z_aux @ sae.W_dec - e_BD) ** 2).sum() / ((e_BD - e_BD.mean(0)) ** 2).sum()
    assert math.isfinite(loss.aux.item()) and loss.aux.item() > 0
    torch.testing.assert_close(loss.aux, ref.detach())
    torch.testing.assert_close(loss.total, loss.fvu + loss.aux / 32)
    steps = sae.steps_since_fired.clone()
    sae.eval()(torch.randn(B, D))  # inference does not count
    assert torch.equal(sae.steps_since_fired, steps)
    sae.train()
    loss.total.backward()  # gradient reaches the dead latents' decoder rows only through aux
    assert sae.W_dec.grad[dead].abs().sum() > 0


def test_auxk_zero_without_dead_and_with_fewer_dead_than_aux_k():
    pre_BF, e_BD, W_FD = torch.randn(B, F), torch.randn(B, D), torch.randn(F, D)
    assert auxk_loss(pre_BF, e_BD, W_FD, torch.zeros(F, dtype=torch.bool), 8).item() == 0.0
    one_dead = torch.zeros(F, dtype=torch.bool)
    one_dead[5] = True
    z_aux = torch.zeros(B, F)
    z_aux[:, 5] = pre_BF[:, 5].clamp_min(0)
    ref = ((z_aux @ W_FD - e_BD) ** 2).sum() / ((e_BD - e_BD.mean(0)) ** 2).sum()
    torch.testing.assert_close(auxk_loss(pre_BF, e_BD, W_FD, one_dead, 8), ref)


# ---- adaLN initialisation from a DiT block -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero; make it non-trivial like a trained model
        for block in dit.transformer_blocks:
            block.norm1.linear.weight.normal_(0, 0.2)
            block.norm1.linear.bias.normal_(0, 0.2)
    return dit


def test_init_modulation_from_adaln_matches_dit_block(tiny_dit):
    block = tiny_dit.transformer_blocks[1]  # reads the output of block 0
    width = block.norm1.linear.in_features
    sae = make("tide", d=width, f=F)
    init_modulation_from_adaln(sae, block)
    t_B = torch.tensor([0.0, 1.5, 250.0, 999.0])
    emb = block.norm1.emb
    with torch.no_grad():
        cond = emb.timestep_embedder(emb.time_proj(t_B))  # class embedding left out
        shift_msa, scale_msa, *_ = block.norm1.linear(block.norm1.silu(cond)).chunk(6, dim=1)
        shift_BD, scale_BD = sae.modulation(t_B)
        torch.testing.assert_close(shift_BD, shift_msa)
        torch.testing.assert_close(scale_BD, scale_msa)
        null_D = emb.class_embedder.embedding_table.weight[10]  # the CFG null label
        init_modulation_from_adaln(sae, block, class_emb_D=null_D)
        cond = emb(t_B, torch.full((4,), 10), hidden_dtype=torch.float32)
        shift_msa, scale_msa, *_ = block.norm1.linear(block.norm1.silu(cond)).chunk(6, dim=1)
        torch.testing.assert_close(sae.modulation(t_B).shift_BD, shift_msa)
        torch.testing.assert_close(sae.modulation(t_B).scale_BD, scale_msa)


def test_init_modulation_from_adaln_rejects_mismatches(tiny_dit):
    block = tiny_dit.transformer_blocks[1]
    width = block.norm1.linear.in_features
    with pytest.raises(ValueError, match=f"block width {width} != SAE d_model=12"):
        init_modulation_from_adaln(make("tide", d=12), block)
    with pytest.raises(ValueError, match=f"set t_hidden={width}"):
        init_modulation_from_adaln(make("tide", d=width, t_hidden=8), block)
    with pytest.raises(ValueError, match="arch='tide'"):
        init_modulation_from_adaln(make("topk", d=width), block)
    with pytest.raises(ValueError, match="ada_norm_zero"):
        init_modulation_from_adaln(make("tide", d=width), torch.nn.Linear(2, 2))


# ---- save / load, normalisation, dtypes, errors ------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_roundtrip(arch):
    sae = randomize(make(arch))
    sae.set_input_normalization(torch.randn(3, D), 2.5, timesteps=torch.tensor([900.0, 500.0, 100.0]))
    x_BD, t_B = torch.randn(B, D), 100 + torch.rand(B) * 800  # inside the recorded timesteps 100..900
    sae(x_BD, t_B)  # moves steps_since_fired and the batchtopk threshold
    blob = save(sae.state_dict())
    cfg = SAEConfig.model_validate_json(json.dumps(sae.cfg.model_dump()))
    loaded = build_sae(cfg)
    loaded.load_state_dict(load(blob))
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    sae.eval(), loaded.eval()
    torch.testing.assert_close(loaded.forward_raw(x_BD, t_B).x_hat_BD, sae.forward_raw(x_BD, t_B).x_hat_BD)
    buffer = io.BytesIO()
    torch.save(sae.state_dict(), buffer)  # plain torch checkpoints work too


def test_forward_raw_uses_nearest_timestep_mean():
    sae = randomize(make("tide"))
    mean_SD, t_S = torch.randn(3, D), torch.tensor([900.0, 500.0, 100.0])
    sae.set_input_normalization(mean_SD, 4.0, timesteps=t_S)
    x_raw, t_B = torch.randn(B, D) * 4 + 1, torch.tensor([999.0, 880.0, 700.1, 600.0, 420.0, 90.0, 0.0])
    nearest = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    x_n = (x_raw - mean_SD[nearest]) / 4.0
    ref = sae(x_n, t_B).x_hat_BD * 4.0 + mean_SD[nearest]
    out = sae.forward_raw(x_raw, t_B)
    torch.testing.assert_close(out.x_hat_BD, ref)
    torch.testing.assert_close(out.z_BF, sae(x_n, t_B).z_BF)
    topk = make("topk")
    topk.set_input_normalization(mean_SD[0], 2.0)
    torch.testing.assert_close(
        topk.forward_raw(x_raw).x_hat_BD, topk(x_raw / 2 - mean_SD[0] / 2).x_hat_BD * 2 + mean_SD[0]
    )
    with pytest.raises(ValueError, match=r"timesteps must have shape \(3,\)"):
        topk.set_input_normalization(mean_SD, 1.0)
    with pytest.raises(ValueError, match="num_train_timesteps=1000"):
        topk.set_input_normalization(mean_SD, 1.0, timesteps=torch.tensor([1000.0, 500.0, 0.0]))


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_forward_and_loss(arch):
    sae = randomize(make(arch)).to(torch.bfloat16)
    x_BD = torch.randn(B, D, dtype=torch.bfloat16)
    out = sae(x_BD, torch.rand(B) * 1000)
    assert out.x_hat_BD.dtype == torch.bfloat16
    loss = sae_loss(sae, x_BD, out)
    assert loss.total.dtype == torch.float32 and torch.isfinite(loss.total)
    loss.total.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(sae_loss(sae, x_BD, sae(x_BD, torch.rand(B) * 1000)).total)


def test_timesteps_are_scheduler_values_and_step_indices_are_refused():
    """An SAE trained on the demo store's 50 DDPM timesteps 999..19 refuses step indices 0..49 in eval mode."""
    t_S = torch.arange(999, 0, -20).float()  # 999, 979, ..., 19
    x_BD = torch.randn(50, D)
    tide = randomize(make("tide"))
    tide.set_input_normalization(torch.randn(50, D), 2.0, timesteps=t_S)
    tide.eval()
    steps = torch.arange(50)
    with pytest.raises(ValueError, match=r"t_B spans 0\.\.49, but .* timesteps 19\.\.999.*not step indices"):
        tide.forward_raw(x_BD, steps)
    with pytest.raises(ValueError, match=r"t_B spans 5\.\.5"):
        tide.encode(x_BD, 5.0)  # a float, the normalised-input entry point
    assert tide.timestep_range() == (19.0, 999.0)
    # The scheduler's values pass, as a tensor, a float, an int, with rounding inside the tolerance.
    ok = tide.forward_raw(x_BD, t_S).x_hat_BD
    torch.testing.assert_close(tide.forward_raw(x_BD[:1], 999.0).x_hat_BD, ok[:1])
    tide.forward_raw(x_BD[:1], 19)
    tide.forward_raw(x_BD[:1], torch.tensor(18.6))
    with pytest.raises(ValueError, match="t_B spans 18.4..18.4"):
        tide.forward_raw(x_BD[:1], 18.4)
    with pytest.raises(ValueError, match="t_B spans 19..1010"):
        tide(x_BD[:2], torch.tensor([19.0, 1010.0]))
    tide.train()  # training mode is not checked: the trainer feeds the store's own timesteps
    tide(x_BD, steps)

    # topk with per-step means (as `tide train` writes) needs t in forward_raw, for the mean only.
    topk = randomize(make("topk"))
    topk.set_input_normalization(torch.randn(50, D), 2.0, timesteps=t_S)
    topk.eval()
    with pytest.raises(ValueError, match=r"topk SAE needs timesteps t_B for its per-timestep input means"):
        topk.forward_raw(x_BD)
    with pytest.raises(ValueError, match="not step indices"):
        topk.forward_raw(x_BD, steps)
    torch.testing.assert_close(topk(x_BD).x_hat_BD, topk(x_BD, steps).x_hat_BD)  # forward ignores t
    # One mean and no modulation: t is not used at all, so it may be None (or anything).
    plain = randomize(make("topk"))
    plain.set_input_normalization(torch.randn(D), 2.0)
    plain.eval()
    assert plain.timestep_range() is None
    torch.testing.assert_close(plain.forward_raw(x_BD).x_hat_BD, plain.forward_raw(x_BD, steps).x_hat_BD)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"x has shape \(7, 5\), expected \(B, 12\)"):
        make("topk")(torch.randn(B, 5))
    with pytest.raises(ValueError, match="needs timesteps"):
        make("tide")(torch.randn(B, D))
    with pytest.raises(ValueError, match=r"t_B has shape \(3,\), expected \(7,\)"):
        make("tide")(torch.randn(B, D), torch.rand(3))


# ---- optimisation ------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    # Tiny matmuls are dominated by thread-pool overhead, which explodes on a loaded 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ARCHS)
def test_short_training_reduces_error(arch, one_thread):
    """Synthetic data: each row is K of G=16 unit atoms with positive weights, plus a little noise."""
    g = torch.Generator().manual_seed(0)
    atoms_GD = torch.randn(16, D, generator=g)
    atoms_GD /= atoms_GD.norm(dim=1, keepdim=True)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.rand(n, 16, generator=g).argsort(dim=1)[:, :K]
        coef_BG = torch.zeros(n, 16).scatter(1, idx, 0.5 + torch.rand(n, K, generator=g))
        return coef_BG @ atoms_GD + 0.01 * torch.randn(n, D, generator=g), torch.rand(n, generator=g) * 1000

    sae = make(arch, l1_coeff=1e-2)
    x_val, t_val = batch(512)
    sae.init_decoder_bias(x_val)
    with torch.no_grad():
        before = sae_loss(sae, x_val, sae(x_val, t_val)).fvu.item()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(300):
        x_BD, t_B = batch(256)
        loss = sae_loss(sae, x_BD, sae(x_BD, t_B))
        opt.zero_grad()
        loss.total.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
    sae.eval()  # batchtopk: evaluated with its learned inference threshold
    with torch.no_grad():
        after = sae_loss(sae, x_val, sae(x_val, t_val)).fvu.item()
    # Seen: about 10x for the TopK variants, far more for relu; 5x leaves room for platform noise.
    assert after < before / 5, (before, after)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
