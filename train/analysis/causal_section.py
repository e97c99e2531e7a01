"""The causal section of a latent page: its top samples redrawn with the latent off and scaled up.

For each paged latent, its first `causal_samples` top samples (distinct, largest activation first) are
redrawn twice through train/loop/causal.py, the latent's activation multiplied by 0 and by `causal_scale` in
the SAE's code (error term kept, every step, both CFG rows); all pages' redraws share batches. A picture per
sample: the clean image, the latent off, its pixel difference from the clean image, the latent scaled up,
and its difference (red: brighter than clean, blue: darker). Where the store's model is the shipped demo,
a table gives each pixel attribute (train/analysis/attributes.py) of the clean images and its change under
each edit, averaged over the pictured samples.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tide.train.analysis.attributes import ATTRIBUTES, UNITS, as_array, attributes

GAP = 4
"""Pixels between the panels of a picture."""


class Causal(NamedTuple):
    """The redraws of every paged latent."""

    samples: dict[int, list[int]]
    """Latent -> its redrawn samples."""
    off: dict[tuple[int, int], np.ndarray]
    """(latent, sample) -> (H, W, C) uint8 image with the latent off."""
    up: dict[tuple[int, int], np.ndarray]
    """(latent, sample) -> the image with the latent scaled up."""
    scale: float
    shipped: bool
    """The store's model is the shipped demo: attribute changes are shown."""


def redraw_all(loaded, store, tops: dict, n: int, scale: float, model, device, progress: bool, log) -> Causal:
    """Redraw each latent's first n top samples with the latent off and scaled up, in shared batches."""
    from tide.train.loop.causal import Request, redraw
    from tide.train.loop.rerun import rerun
    from tqdm.auto import tqdm

    samples = {f: [t.sample for t in ts[:n]] for f, ts in tops.items()}
    requests = [Request(i, f, c) for f, ss in samples.items() for i in ss for c in (0.0, scale)]
    log(f"causal section: redrawing {len(requests)} images (latents off and x{scale:g}; --causal 0 skips it)")
    run = rerun(store.meta, device=device, model=model)
    total = len(requests) * run.meta.num_inference_steps
    with tqdm(total=total, unit="img-step", desc="causal", disable=not progress) as bar:
        images = redraw(loaded, run, requests, on_step=bar.update)
    drawn = {(r.latent, r.sample, r.factor): img for r, img in zip(requests, images, strict=True)}
    off = {(f, i): drawn[(f, i, 0.0)] for f, ss in samples.items() for i in ss}
    up = {(f, i): drawn[(f, i, scale)] for f, ss in samples.items() for i in ss}
    return Causal(samples, off, up, scale, run.shipped_demo())


def _rgb_big(img_HWC: np.ndarray, scale: int) -> np.ndarray:
    img = img_HWC if img_HWC.shape[-1] == 3 else np.repeat(img_HWC[..., :1], 3, axis=-1)
    return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))


def difference_rgb(edited_HWC: np.ndarray, clean_HWC: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W, 3) uint8 heatmap of edited - clean (intensity in [0, 1], channels averaged): red brighter,
    blue darker, white unchanged, full colour at +-vmax."""
    from matplotlib import colormaps

    d_HW = (edited_HWC.astype(np.float64).mean(-1) - clean_HWC.astype(np.float64).mean(-1)) / 255
    level = np.clip(d_HW / max(vmax, 1 / 255) / 2 + 0.5, 0, 1)
    return (colormaps["RdBu_r"](level)[..., :3] * 255).round().astype(np.uint8)


def picture_png(path: Path, clean, off, up, vmax: float, pixels: int) -> None:
    """clean | off | off - clean | up | up - clean, side by side."""
    from PIL import Image

    scale = max(1, pixels // clean.shape[1])
    panels = [
        _rgb_big(clean, scale),
        _rgb_big(off, scale),
        _rgb_big(difference_rgb(off, clean, vmax), scale),
        _rgb_big(up, scale),
        _rgb_big(difference_rgb(up, clean, vmax), scale),
    ]
    gap = np.full((panels[0].shape[0], GAP, 3), 255, dtype=np.uint8)
    row = [p for panel in panels for p in (panel, gap)][:-1]
    Image.fromarray(np.concatenate(row, axis=1)).save(path)


def _attribute_table(clean: np.ndarray, off: np.ndarray, up: np.ndarray, scale: float) -> str:
    a0, a_off, a_up = (as_array(attributes(x)) for x in (clean, off, up))
    rows = "".join(
        f"<tr><td>{name}</td><td class=num>{np.nanmean(a0[:, j]):.3g}</td>"
        f"<td class=num>{np.nanmean(a_off[:, j] - a0[:, j]):+.3g}</td>"
        f"<td class=num>{np.nanmean(a_up[:, j] - a0[:, j]):+.3g}</td><td>{UNITS[name]}</td></tr>"
        for j, name in enumerate(ATTRIBUTES)
    )
    return (
        "<table class=attrs><thead><tr><th>attribute</th><th>clean</th><th>change, off</th>"
        f"<th>change, x{scale:g}</th><th>unit</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def section(out: Path, f: int, causal: Causal, images: dict[int, np.ndarray], pixels: int) -> str:
    """Write latent f's pictures; return the page's causal section (HTML)."""
    ss = causal.samples.get(f, [])
    if not ss:
        return ""
    clean = np.stack([images[i] for i in ss])
    off = np.stack([causal.off[(f, i)] for i in ss])
    up = np.stack([causal.up[(f, i)] for i in ss])
    diff = np.abs(np.concatenate([off, up]).astype(np.float64) - np.concatenate([clean, clean])).mean(-1)
    vmax = max(float(diff.max()) / 255, 1 / 255)
    figures = []
    for j, i in enumerate(ss):
        picture_png(out / "img/causal" / f"{f:05d}_{j}.png", clean[j], off[j], up[j], vmax, pixels)
        figures.append(
            f'<figure><img src="../img/causal/{f:05d}_{j}.png" alt="sample {i}: clean, latent off, difference, '
            f'latent x{causal.scale:g}, difference"><figcaption>sample {i}: clean · off · off − clean · '
            f"×{causal.scale:g} · ×{causal.scale:g} − clean</figcaption></figure>"
        )
    note = (
        f"The latent's activation multiplied by 0 (off) and by {causal.scale:g} in the SAE's code, at every step "
        "and token where it fires, the rest of the activations (the SAE's error included) kept; the sample "
        f"redrawn from its seed. Differences: red brighter, blue darker than clean, full colour at ±{vmax:.2f} "
        "of full intensity."
    )
    table = _attribute_table(clean, off, up, causal.scale) if causal.shipped else ""
    return (
        "<h2>What it does: turned off and scaled up</h2>\n"
        f'<p class="note">{html.escape(note)}</p>\n<div class="causal">\n'
        + "\n".join(figures)
        + "\n</div>\n"
        + table
    )
