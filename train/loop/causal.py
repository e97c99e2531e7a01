"""What a latent does to the image: redraw samples with latents scaled in the SAE's code, many latents per batch.

`scale_edit` multiplies latent F's activation by c on every token of a row, keeping everything else the SAE
does not explain: x + (c - 1) z_F(x, t) d_F(t), with d_F(t) the latent's raw-space decoder direction
(train/loop/steer.py `direction`). That is `tide steer --clamp`'s edit with z_F := c z_F instead of a
constant (c = 0 is `--clamp 0`: the latent turned off), and c = 1 returns x bit for bit. It only acts where
the latent fires, so it shows what the latent does in the images it was found in.

`redraw` draws a list of (sample, latent, factor) requests, each sample with its harvest seed and label and
only its own latent scaled, batching requests of different latents together: a features report draws every
page's redraws in a few large batches instead of one small run per latent.

Shape key: R model-batch rows (2B with CFG), B requests, N tokens, D width, F latents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from tide.train.fit.checkpoint import LoadedSAE
from tide.train.loop.rerun import Intervention, Rerun
from tide.train.loop.splice import sae_target
from tide.train.loop.steer import direction


class Request(NamedTuple):
    """One redraw: `sample` of the store, with `latent` scaled by `factor`."""

    sample: int
    latent: int
    factor: float


def scale_edit(sae, latents_B: Sequence[int], factors_B: Sequence[float]) -> Callable:
    """Edit scaling latent latents_B[b] by factors_B[b] in row b (and in its CFG twin rows)."""
    lat_B = torch.as_tensor(list(latents_B), dtype=torch.int64)
    fac_B = torch.as_tensor(list(factors_B), dtype=torch.float32)

    def edit(site: str, layer: int, step: int, t: float, x_RND: torch.Tensor) -> torch.Tensor:
        R, N, D = x_RND.shape
        lat_R, fac_R = lat_B.repeat(R // len(lat_B)), fac_B.repeat(R // len(lat_B))  # CFG rows repeat samples
        with torch.no_grad():
            z_RNF = sae.forward_raw(x_RND.reshape(R * N, D).float(), t).z_BF.reshape(R, N, -1)
            z_RN = z_RNF.gather(2, lat_R.to(z_RNF.device)[:, None, None].expand(R, N, 1))[..., 0]
            dirs = {f: direction(sae, f, t) for f in lat_B.unique().tolist()}
            d_RD = torch.stack([dirs[f] for f in lat_R.tolist()])
            delta_RND = ((fac_R.to(z_RN) - 1)[:, None] * z_RN)[..., None] * d_RD[:, None, :]
        return x_RND + delta_RND.to(x_RND)

    return edit


def redraw(
    s: LoadedSAE,
    run: Rerun,
    requests: Sequence[Request],
    batch_size: int = 64,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(len(requests), H, W, C) uint8 images: each request's sample drawn by `run` (the store's model,
    train/loop/rerun.py) as its harvest drew it, with its latent scaled at the SAE's site and layer, at every
    step and in both CFG rows; `on_step(B)` after each denoising step of a batch of B."""
    site, layer, _ = sae_target(s)
    sae = s.sae.to(run.model.transformer.device).eval()
    out = []
    for lo in range(0, len(requests), batch_size):
        batch = requests[lo : lo + batch_size]
        edit = scale_edit(sae, [r.latent for r in batch], [r.factor for r in batch])
        samples = np.asarray([r.sample for r in batch], dtype=np.int64)
        out.append(run.sample(samples, [Intervention(site, layer, edit)], on_step=on_step).images.numpy())
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 0), dtype=np.uint8)
