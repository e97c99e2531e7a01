"""train/loop/causal.py: the per-row latent scaling edit and the batched redraws of the causal section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tide.train.fit.checkpoint import load_sae
from tide.train.loop.causal import Request, redraw, scale_edit
from tide.train.loop.rerun import rerun
from tide.train.loop.steer import clamp_edit

from tests.splice_helpers import random_sae, tiny_store, write_sae


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_dit):
    root = tmp_path_factory.mktemp("causal")
    store = tiny_store(tiny_dit, root / "s.zarr")
    sae = random_sae(16, store, "resid_l01")
    return write_sae(root / "saes" / "tide", store, "resid_l01", sae)


def test_scale_edit_against_plain_maths_and_the_clamp(sae_dir):
    s = load_sae(sae_dir).sae
    t = float(s.input_mean_t[2])
    x_RND = torch.randn(6, 5, 16) * 3  # 3 requests, cond rows then uncond rows
    latents, factors = [3, 7, 3], [0.0, 4.0, 1.0]
    got = scale_edit(s, latents, factors)("resid", 1, 0, t, x_RND)
    z_RNF = s.forward_raw(x_RND.reshape(30, 16), t).z_BF.reshape(6, 5, -1)
    for r in range(6):
        f, c = latents[r % 3], factors[r % 3]
        # z_F := c z_F, decoded: x + (c - 1) z_F W_dec[F] s (the raw direction is the decoder row times s)
        want = x_RND[r] + (c - 1) * z_RNF[r, :, f, None] * s.W_dec[f].detach() * s.input_scale
        torch.testing.assert_close(got[r], want)
    assert torch.equal(got[[2, 5]], x_RND[[2, 5]])  # factor 1: the activations untouched, bit for bit
    # factor 0 is `tide steer --clamp 0`
    torch.testing.assert_close(got[[0, 3]], clamp_edit(s, 3, 0.0)("resid", 1, 0, t, x_RND[[0, 3]]))


def test_redraws_of_many_latents_share_a_batch_without_mixing(sae_dir):
    from tide.store.reader import open_store

    s = load_sae(sae_dir)
    store = open_store(s.meta.store.path)
    meta = store.meta
    with torch.no_grad():  # the latent firing most on sample 2's stored rows: scaling it must show
        z_SF = torch.stack(
            [
                s.sae.forward_raw(torch.as_tensor(x_TD), float(t)).z_BF.sum(0)
                for x_TD, t in zip(store.root["resid_l01"][2], store.timesteps, strict=True)
            ]
        )
    f = int(z_SF.sum(0).argmax())
    run = rerun(meta, device="cpu")
    requests = [Request(0, 3, 0.0), Request(2, f, 6.0), Request(1, 3, 1.0), Request(0, 9, 6.0)]
    together = redraw(s, run, requests, batch_size=4)
    for r, img in zip(requests, together, strict=True):
        alone = redraw(s, run, [r], batch_size=1)[0]
        np.testing.assert_array_equal(img, alone)
    clean = run.images([0, 1, 2])  # harvest's own denoising loop, no hooks
    np.testing.assert_array_equal(together[2], clean[1])  # factor 1: the clean image, bit for bit
    assert not np.array_equal(together[1], clean[2])
