"""train/loop/causal.py: the per-row latent scaling edit and the batched redraws of the causal section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tide.train.analysis.attributes import ATTRIBUTES, as_array, attributes
from tide.train.fit.checkpoint import load_sae
from tide.train.loop.causal import Request, redraw, scale_edit
from tide.train.loop.rerun import rerun
from tide.train.loop.steer import clamp_edit

from tests.browser_helpers import CHROMIUM, browse, screenshot
from tests.factories import harvested, random_sae, tiny_store, write_sae


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


# After load, the causal section as the browser laid it out: its heading, its pictures (loaded? where, in page
# pixels?), their captions and the attribute table's cells.
CAUSAL_CHECK = """<script>
window.addEventListener("load", () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY, r.width, r.height]; };
  const heading = Array.from(document.querySelectorAll("h2")).find(h => h.textContent.startsWith("What it does"));
  const out = document.createElement("pre");
  out.id = "tide-check";
  out.textContent = JSON.stringify({
    heading: heading ? box(heading) : null,
    pictures: Array.from(document.querySelectorAll(".causal img")).map(i => ({
      src: i.getAttribute("src"), loaded: i.complete && i.naturalWidth > 0, size: [i.naturalWidth, i.naturalHeight],
      box: box(i),
    })),
    captions: Array.from(document.querySelectorAll(".causal figcaption")).map(c => c.textContent),
    table: Array.from(document.querySelectorAll("table.attrs tbody tr")).map(
      r => Array.from(r.children).map(c => c.textContent)),
  });
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """`tide features` with its causal section on a store of the shipped demo model (8 samples of classes 3
    and 5, 4 steps, final images saved; a random tide SAE on layer 1): one page (the latent that best tells
    the classes apart, so it fires on several samples), its first 2 top samples redrawn."""
    from tide.harvest.config import DEMO_MODEL
    from tide.train.analysis.features import FeaturesConfig
    from tide.train.analysis.report import features_report

    root = tmp_path_factory.mktemp("demo-report")
    store = harvested(
        DEMO_MODEL, root / "s.zarr", num_samples=8, num_steps=4, batch_size=4, layers="1", token_fraction=0.25,
        labels="3,5", dtype="float32", save_images=True,
    )  # fmt: skip
    sae = write_sae(root / "saes" / "tide", store, "resid_l01", random_sae(128, store, "resid_l01"))
    fcfg = FeaturesConfig(split="all", top_k=32, buckets=2, images_per_page=2, max_pages=1, progress=False)
    return features_report(sae, root / "rep", fcfg, device="cpu", log=lambda m: None)


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)"
)
def test_latent_page_shows_the_causal_section_in_headless_chromium(demo_report, tmp_path):
    """The page of a shipped-model store, drawn by a real Chromium: the section's heading, both pictures
    loaded and on screen pixel for pixel as written (clean | off | off - clean | x4 | x4 - clean), and the
    attribute table the pictured images give, recomputed from the pictures' own panels."""
    from PIL import Image
    from tide.train.analysis.report import PIXELS

    (f,) = demo_report.pages
    page = demo_report.out / "latents" / f"{f:05d}.html"
    window = (1280, 1024)
    seen = browse(page, CAUSAL_CHECK, window)
    assert seen["heading"] is not None and seen["heading"][3] > 0, seen
    assert [p["src"] for p in seen["pictures"]] == [f"../img/causal/{f:05d}_{j}.png" for j in range(2)]
    assert all(p["loaded"] and p["size"] == [5 * PIXELS + 4 * 4, PIXELS] for p in seen["pictures"]), seen
    assert all("clean · off · off − clean · ×4 · ×4 − clean" in c for c in seen["captions"])
    # what is on screen: a viewport tall enough for the section, each picture cut out where the DOM put it
    height = int(max(p["box"][1] + p["box"][3] for p in seen["pictures"])) + 40
    shot = np.asarray(Image.open(screenshot(page, tmp_path / "page.png", (window[0], height))).convert("RGB"))
    panels = []
    for p in seen["pictures"]:
        x, y, w, h = (round(v) for v in p["box"])
        want = np.asarray(Image.open(page.parent / p["src"]).convert("RGB"))
        assert (w, h) == (want.shape[1], want.shape[0])
        assert np.abs(shot[y : y + h, x : x + w].astype(int) - want).max() <= 2  # sRGB rounding at most
        step = PIXELS + 4  # five panels of PIXELS, 4 white pixels apart; 16x16 images at 8 screen pixels each
        panels.append(
            [want[:: PIXELS // 16, k * step : k * step + PIXELS : PIXELS // 16][..., :1] for k in (0, 1, 3)]
        )
    clean, off, up = (np.stack(p) for p in zip(*panels, strict=True))
    a0, a_off, a_up = (as_array(attributes(x)) for x in (clean, off, up))
    assert [row[0] for row in seen["table"]] == list(ATTRIBUTES)
    for j, row in enumerate(seen["table"]):
        assert row[1:4] == [
            f"{np.nanmean(a0[:, j]):.3g}", f"{np.nanmean(a_off[:, j] - a0[:, j]):+.3g}",
            f"{np.nanmean(a_up[:, j] - a0[:, j]):+.3g}",
        ]  # fmt: skip
