"""The architecture registry, JumpReLU and Matryoshka SAEs, against plain references written out here.

Shape key: B batch, D model width, F SAE latents, P Matryoshka prefixes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from tide.train.analysis.eval import evaluate_folders, format_table
from tide.train.fit.checkpoint import load_sae
from tide.train.fit.config import TrainConfig
from tide.train.fit.trainer import train
from tide.train.sae.archs import ARCHITECTURES
from tide.train.sae.loss import sae_loss
from tide.train.sae.model import SAE, SAEConfig, build_sae

from tests.factories import random_store, synthetic_store, train_config, trained

B, D, F, K = 64, 12, 32, 3


@pytest.fixture
def one_thread():
    """Tiny matrices: torch's thread pool costs more than it gives, 20x more on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(arch: str, seed: int = 0, **kw) -> SAE:
    torch.manual_seed(seed)
    kw = {"d_model": D, "num_latents": F, "k": K} | kw
    return build_sae(SAEConfig(arch=arch, **kw))


# ---- registry ----------------------------------------------------------------------------------------
def test_unknown_architecture_is_an_error_everywhere():
    with pytest.raises(ValidationError, match="'gated', which is not an SAE architecture; choose from topk"):
        SAEConfig(arch="gated", d_model=D, num_latents=F)
    with pytest.raises(ValidationError, match="'gated', which is not an SAE architecture"):
        TrainConfig(archs="topk,gated")
    with pytest.raises(ValidationError, match="matryoshka_prefixes=\\[8, 4\\] must be increasing"):
        SAEConfig(arch="matryoshka", d_model=D, num_latents=F, matryoshka_prefixes=(8, 4))


def test_specs_read_the_registry(tmp_path):
    store = synthetic_store(tmp_path / "s.zarr", d_model=8)
    cfg = TrainConfig(
        archs="jumprelu,matryoshka,tide-matryoshka", k="2,4", expansion=4, l0_coeff=0.5, l1_coeff=0.7
    )
    specs = {s.name: s.sae for s in cfg.specs(store.meta)}
    assert list(specs) == [
        "resid_l00-jumprelu-k2",  # k: the L0 it starts at
        "resid_l00-jumprelu-k4",
        "resid_l00-matryoshka-k2",
        "resid_l00-matryoshka-k4",
        "resid_l00-tide-matryoshka-k2",
        "resid_l00-tide-matryoshka-k4",
    ]
    assert specs["resid_l00-jumprelu-k2"].l0_coeff == 0.5
    assert (
        specs["resid_l00-matryoshka-k2"].l1_coeff == SAEConfig.model_fields["l1_coeff"].default
    )  # not its own
    assert build_sae(specs["resid_l00-tide-matryoshka-k2"]).modulation is not None
    assert build_sae(specs["resid_l00-matryoshka-k2"]).modulation is None
    assert {"tide", "topk", "batchtopk", "relu", "jumprelu", "matryoshka"} <= set(ARCHITECTURES)


# ---- JumpReLU ----------------------------------------------------------------------------------------
def test_jumprelu_forward_is_pre_times_step():
    sae = make("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(F))
    x_BD = torch.randn(B, D)
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    z_BF = sae(x_BD).z_BF
    torch.testing.assert_close(z_BF, torch.where(pre_BF > sae.threshold, pre_BF, 0.0))


def _smoothed_objective(pre_BF, theta_F, c_BF, eps, l0_coeff):
    """A linear read-out of JumpReLU(pre) plus l0_coeff * L0, with both jumps smoothed in theta by the rectangle
    kernel of width eps. The step H(pre - theta) becomes clamp((pre - theta) / eps + 1/2, 0, 1); the jump of
    JumpReLU, pre * H(pre - theta), becomes the function whose theta-derivative is -(theta / eps) inside the
    window and which falls from pre to 0 across it: pre - (theta^2 - (pre - eps/2)^2) / (2 eps)."""
    lo = pre_BF - eps / 2
    inside = (theta_F > lo) & (theta_F < pre_BF + eps / 2)
    jump = torch.where(theta_F <= lo, pre_BF, torch.zeros_like(pre_BF))
    jump = torch.where(inside, pre_BF - (theta_F**2 - lo**2) / (2 * eps), jump)
    step = ((pre_BF - theta_F) / eps + 0.5).clamp(0, 1)
    return (c_BF * jump).sum() + l0_coeff * step.sum(-1).mean()


def test_jumprelu_threshold_gradient_matches_finite_differences_of_the_smoothed_objective():
    eps, l0_coeff = 0.2, 0.3
    sae = make("jumprelu", jumprelu_bandwidth=eps, l0_coeff=l0_coeff, d_model=8, num_latents=6).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.threshold.copy_(0.3 + 0.5 * torch.rand(6, generator=g, dtype=torch.float64))
    x_BD = torch.randn(400, 8, generator=g, dtype=torch.float64)
    c_BF = torch.randn(400, 6, generator=g, dtype=torch.float64)
    out = sae(x_BD)
    loss = (c_BF * out.z_BF).sum() + sae_loss(sae, x_BD, out).penalty * l0_coeff
    (grad_F,) = torch.autograd.grad(loss, sae.threshold)

    pre_BF = out.pre_BF.detach()
    theta_F, h = sae.threshold.detach(), 1e-6
    for f in range(6):
        up, down = theta_F.clone(), theta_F.clone()
        up[f] += h
        down[f] -= h
        fd = (
            _smoothed_objective(pre_BF, up, c_BF, eps, l0_coeff)
            - _smoothed_objective(pre_BF, down, c_BF, eps, l0_coeff)
        ) / (2 * h)
        assert float(grad_F[f]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8), f
    assert (grad_F != 0).all()  # every latent had rows inside its window: the check is not vacuous


def test_jumprelu_training_reaches_a_sparse_code(one_thread):
    """The threshold learns: the L0 penalty pulls L0 from about F/2 (threshold 0.01) far down."""
    sae = make("jumprelu", l0_coeff=0.05, num_latents=48, jumprelu_init_threshold=0.01)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    atoms_FD = torch.nn.functional.normalize(torch.randn(48, D, generator=g), dim=-1)
    first = None
    for _ in range(150):
        codes = torch.rand(256, 48, generator=g) * (torch.rand(256, 48, generator=g) < 0.06)
        x_BD = codes @ atoms_FD * 3
        loss = sae_loss(sae, x_BD, sae(x_BD))
        first = first if first is not None else float(loss.l0)
        opt.zero_grad()
        loss.total.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
    l0, fvu = float(loss.l0), float(loss.fvu.detach())
    assert first > 15 and l0 < 8 and fvu < 0.5, (
        first,
        float(loss.l0),
        float(loss.fvu),
    )


def test_trainer_moves_jumprelu_thresholds_faster_than_lr_allows(tmp_path):
    """Adam moves a parameter by about lr per step, so without jumprelu_threshold_lr_scale no threshold could
    leave its start by more than the summed lr of the run, and l0_coeff would have nothing to act on (on
    the demo store, l0_coeff 0 and 2e-3 gave the same L0 and FVU to 3 digits: train/RESULTS.md)."""
    store = random_store(tmp_path / "s.zarr")
    start = 0.5
    cfg = train_config(
        store.path, tmp_path / "o", layers="0", archs="jumprelu", k=(4,), jumprelu_init_threshold=start,
        batch_size=64, max_steps=8, warmup_steps=0, lr=1e-3, val_fraction=0.25,
    )  # fmt: skip
    (folder,) = train(cfg, log=lambda m: None).saes
    moved = float((load_sae(folder).sae.threshold.detach() - start).abs().max())
    assert moved > 3 * 8 * 1e-3, moved  # beyond what lr alone allows (warm-up lowers it further)
    assert cfg.specs(store.meta)[0].sae.jumprelu_threshold_lr_scale == 30


def test_jumprelu_thresholds_from_the_first_batch_give_k_per_row():
    sae = make("jumprelu", k=5).train()
    x_BD = torch.randn(B, D) * 2 + 1
    sae.init_from_data(x_BD)
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert int((pre_BF > sae.threshold).sum()) == 5 * B - 1  # all but the kth itself, which equals it
    assert torch.equal(sae.threshold, sae.threshold[0].expand(F))
    fixed = make("jumprelu", jumprelu_init_threshold=0.3)
    fixed.init_from_data(x_BD)
    assert torch.equal(fixed.threshold, torch.full((F,), 0.3))


# ---- Matryoshka --------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["topk", "batchtopk"])
def test_matryoshka_loss_is_the_sum_of_the_prefixes_fvus(inner):
    sae = make("matryoshka", matryoshka_prefixes=(4, 10, 20), matryoshka_inner=inner, aux_coeff=0.0)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x_BD = torch.randn(B, D)
    out = sae(x_BD)
    loss = sae_loss(sae, x_BD, out)

    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    if inner == "topk":
        kept_BF = pre_BF >= pre_BF.topk(K, dim=-1).values[:, -1:]
    else:
        kept_BF = pre_BF >= pre_BF.flatten().topk(K * B).values[-1]
    z_BF = torch.where(kept_BF, pre_BF.relu(), 0.0)
    torch.testing.assert_close(out.z_BF, z_BF)
    want = 0.0
    for m in (4, 10, 20, F):  # the full dictionary is the last prefix
        x_hat = z_BF[:, :m] @ sae.W_dec[:m] + sae.b_dec
        want = want + ((x_hat - x_BD) ** 2).sum() / ((x_BD - x_BD.mean(0)) ** 2).sum()
    torch.testing.assert_close(loss.total, want)
    torch.testing.assert_close(loss.total, loss.fvu + loss.penalty)


def _train(sae: SAE, atoms_FD: torch.Tensor, steps: int = 300) -> None:
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    F_true = atoms_FD.shape[0]
    # Latent i fires with probability falling with i: a few general directions, many rare ones.
    p_F = 0.5 / (1 + torch.arange(F_true, dtype=torch.float32))
    for i in range(steps):
        codes = torch.rand(256, F_true, generator=g) * (torch.rand(256, F_true, generator=g) < p_F)
        x_BD = codes @ atoms_FD
        if i == 0:
            sae.init_decoder_bias(x_BD)
        loss = sae_loss(sae, x_BD, sae(x_BD))
        opt.zero_grad()
        loss.total.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()


def test_each_matryoshka_prefix_reconstructs_alone(one_thread):
    """Trained on the same data, the matryoshka SAE's first 4 latents alone explain much of the variance,
    and each larger prefix more; a plain TopK SAE's first 4 latents are as good as any other 4."""
    g = torch.Generator().manual_seed(3)
    atoms_FD = torch.nn.functional.normalize(torch.randn(24, D, generator=g), dim=-1)
    prefixes = (4, 8, 16)
    mat = make("matryoshka", matryoshka_prefixes=prefixes, matryoshka_inner="topk", k=4)
    top = make("topk", k=4)
    _train(mat, atoms_FD)
    _train(top, atoms_FD)
    codes = torch.rand(2000, 24, generator=g) * (
        torch.rand(2000, 24, generator=g) < 0.5 / (1 + torch.arange(24))
    )
    x_BD = codes @ atoms_FD
    mat.eval(), top.eval()
    with torch.no_grad():
        z_mat, z_top = mat(x_BD).z_BF, top(x_BD).z_BF

    def fvu(z_BF, sae, m):
        x_hat = z_BF[:, :m] @ sae.W_dec[:m] + sae.b_dec
        return float(((x_hat - x_BD) ** 2).sum() / ((x_BD - x_BD.mean(0)) ** 2).sum())

    mat_fvus = [fvu(z_mat, mat, m) for m in (*prefixes, F)]
    assert mat_fvus == sorted(mat_fvus, reverse=True) and mat_fvus[0] < 0.6 and mat_fvus[-1] < 0.2, mat_fvus
    assert fvu(z_top, top, 4) > mat_fvus[0] + 0.2, (fvu(z_top, top, 4), mat_fvus)
    with torch.no_grad():  # prefix_reconstructions is what eval and the loss use
        got = mat.arch.prefix_reconstructions(mat, z_mat)
    assert [fvu(z_mat, mat, m) for m in prefixes] == pytest.approx(
        [float(((h - x_BD) ** 2).sum() / ((x_BD - x_BD.mean(0)) ** 2).sum()) for h in got]
    )


# ---- the one-pass-many-SAEs loop and eval -------------------------------------------------------------
def test_new_archs_train_in_one_pass_and_eval_reports_prefix_fvu(tmp_path):
    store = random_store(tmp_path / "s.zarr")
    folders = trained(
        store.path, tmp_path / "o", layers="0", archs="jumprelu,tide-jumprelu,matryoshka,tide-matryoshka",
        k=(4,), matryoshka_prefixes=(8, 16), batch_size=64, max_steps=6, warmup_steps=0, val_fraction=0.25,
    )  # fmt: skip
    assert [f.name for f in folders] == [
        "resid_l00-jumprelu-k4",
        "resid_l00-tide-jumprelu-k4",
        "resid_l00-matryoshka-k4",
        "resid_l00-tide-matryoshka-k4",
    ]
    results = evaluate_folders(folders, batch_size=50)
    assert [r.prefixes for r in results[:2]] == [[], []]
    x_all = store.root["resid_l00"][:].astype(np.float32)
    for folder, res in zip(folders[2:], results[2:], strict=True):
        loaded = load_sae(folder)
        assert "threshold" in loaded.sae.state_dict()  # batchtopk inside: its threshold is saved
        val = [i for a, b in loaded.meta.split.val_samples(store.layout) for i in range(a, b)]
        x = torch.as_tensor(x_all[val])  # (n, S, T, D)
        t = torch.as_tensor(store.timesteps, dtype=torch.float32)[None, :, None].expand(x.shape[:3])
        x_BD, t_B = x.reshape(-1, 16), t.reshape(-1)
        with torch.no_grad():
            z_BF = loaded.sae.forward_raw(x_BD, t_B).z_BF
            for p, m in zip(res.prefixes, (8, 16), strict=True):
                x_hat = loaded.sae.denormalize(z_BF[:, :m] @ loaded.sae.W_dec[:m] + loaded.sae.b_dec, t_B)
                want = float(
                    ((x_hat - x_BD).double() ** 2).sum() / ((x_BD - x_BD.mean(0)).double() ** 2).sum()
                )
                assert p.latents == m and p.fvu == pytest.approx(want, rel=1e-5)
        assert json.loads((folder / "eval.json").read_text())["prefixes"][0]["latents"] == 8
        assert "matryoshka prefixes (first m latents alone): 8: fvu" in format_table(res)
