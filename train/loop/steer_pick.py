"""How `make steer-demo` picks each attribute's latent (train/loop/steer_demo.py, step 1), on the SAE's
training samples only.

By prediction (the default, `pick_latents`): the per-sample mean activation of every latent over the probe
samples' stored rows, its Pearson r with each attribute within class, and per attribute the latent with the
largest |r|; the sign of r is the declared direction.

By effect (`--pick effect`, `pick_by_effect`). A latent can predict an attribute because it reads what the
image already shows, without being what draws it; this measures what steering does instead:
1. Candidates: for each attribute the `candidates` latents with the largest |within-class r|; their union
   is screened once, every attribute read from the same images.
2. Screen: each candidate is steered up at the demo's strongest multiple (tide steer's added direction,
   every step, both CFG rows; one latent per row, many per batch) on the first `screen_samples` probe
   samples. Per candidate and attribute: the mean change, steered minus unsteered on the same seed, in units
   of the probe samples' standard deviation; per candidate: how often the class is kept and the image stays
   as close to a real digit as the farthest unsteered screened sample.
3. Pick: per attribute the candidate with the largest |change| among those keeping the class and staying
   digit-like on at least MIN_KEPT of the screened samples (when none does, the largest |change| of all);
   the sign of its change is the declared direction. The held-out measurement that follows is the demo's.

By region (`--pick region`, `pick_for_regions`). Size, position and slant are where the ink is, and an
edit added to every token carries no where. So one latent is picked, the ink latent: of the candidates the
effect pick screens (every attribute's `candidates` best predictors: a latent that predicts ink need not be
one that draws it), the one whose steering changes ink most while keeping class and digit-likeness. Each attribute steers it on the tokens of one region of the image (train/loop/regions.py),
read off the attribute's definition: the region where ink added lowers the attribute for a digit centred
in the frame (REGION_OF). A latent that removes ink there raises the attribute; one that adds ink lowers
it. So the declared direction is the latent's ink direction times the region's sign.

By push-pull (`--pick push-pull`, `pick_for_regions(signed=True)`): the same latent, added on the region and
subtracted on its complement (the signed region `R/complement`, train/loop/regions.py). Subtracting the ink
latent's direction draws ink (measured: -1x to -4x on every token add 1.3 to 4.1 sd of ink, classes kept),
so the edit takes ink from one side and puts it on the other: the digit moves instead of fading. Both
halves push the attribute the same way, so the declared direction is the region pick's. Ink keeps `all`.

Shape key: N samples, S steps, T tokens, D width, F latents, A attributes, C candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from tide.train.analysis.attributes import ATTRIBUTES, as_array, attributes
from tide.train.fit.checkpoint import LoadedSAE

MIN_KEPT = 0.8
"""pick by effect: the fraction of screened samples a candidate must keep in class and digit-like."""

REGION_OF: dict[str, tuple[str, int]] = {
    "ink": ("all", +1),  # ink added anywhere raises it
    "width": ("inner-cols", -1),  # ink near the middle column narrows the w-weighted std of x
    "height": ("inner-rows", -1),
    "center_x": ("left", -1),  # ink on the left moves the w-weighted mean of x left
    "center_y": ("top", -1),
    "slant": ("antidiagonal", -1),  # ink top-right and bottom-left makes cov(x, y) more negative: '/'
}
"""pick region: per attribute, (region, sign of the attribute's change when ink is added in it)."""


class Pick(NamedTuple):
    """The latent chosen for one attribute."""

    attribute: str
    latent: int
    r_within: float
    """Pearson r of the latent's per-sample mean activation with the attribute, class means removed."""
    r: float
    """The same without removing class means (for comparison)."""
    direction: int
    """+1 or -1: the way the attribute should move when the latent goes up (sign of r_within, or of the
    screened change)."""
    unit: float
    """The latent's mean activation where it fires (the steering strengths are multiples of it)."""
    fires: float
    """Fraction of the probe samples on which it fires at some stored row."""
    screened: float | None = None
    """pick by effect: the attribute's mean change, in sds, when the screen steered the latent up."""
    region: str | None = None
    """pick region: the region of the image tokens it is steered on (train/loop/regions.py); None: all."""


class Activity(NamedTuple):
    """What the SAE does on the probe samples (sample_activity)."""

    act_NF: np.ndarray
    """Each sample's mean activation over its stored rows (the SAE's steps, every stored token)."""
    fired_NF: np.ndarray
    """Whether it fired at some stored row of the sample."""
    unit_F: np.ndarray
    """Each latent's mean activation where it fires."""


@torch.no_grad()
def sample_activity(s: LoadedSAE, store, samples: np.ndarray) -> Activity:
    """The SAE's activity on the store's rows of `samples`."""
    lo, hi = s.meta.step_range
    x_NSTD = torch.as_tensor(store.root[s.meta.array].get_orthogonal_selection((samples,)).astype(np.float32))
    t_S = store.timesteps
    N, _, T, D = x_NSTD.shape
    F = s.meta.sae.num_latents
    mean_NF, fired_NF = torch.zeros(N, F), torch.zeros(N, F, dtype=torch.bool)
    total_F, count_F = torch.zeros(F, dtype=torch.float64), torch.zeros(F, dtype=torch.float64)
    for step in range(lo, hi):
        z_NTF = s.sae.forward_raw(x_NSTD[:, step].reshape(N * T, D), float(t_S[step])).z_BF.reshape(N, T, F)
        mean_NF += z_NTF.mean(1) / (hi - lo)
        fired_NF |= (z_NTF > 0).any(1)
        total_F += z_NTF.sum((0, 1)).double()
        count_F += (z_NTF > 0).sum((0, 1)).double()
    return Activity(mean_NF.numpy(), fired_NF.numpy(), (total_F / count_F.clamp_min(1)).numpy())


def correlations(act_NF: np.ndarray, attr_NA: np.ndarray, class_N: np.ndarray | None) -> np.ndarray:
    """(A, F) Pearson r of every attribute with every latent, class means removed first when classes are
    given; 0 where a latent (or attribute) does not vary."""
    x, y = act_NF.astype(np.float64), attr_NA.astype(np.float64)
    if class_N is not None:
        for c in np.unique(class_N):
            x[class_N == c] -= x[class_N == c].mean(0)
            y[class_N == c] -= y[class_N == c].mean(0)
    x, y = x - x.mean(0), y - y.mean(0)
    norm_AF = np.sqrt((y**2).sum(0))[:, None] * np.sqrt((x**2).sum(0))[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        r_AF = (y.T @ x) / norm_AF
    return np.nan_to_num(r_AF, nan=0.0)


def pick_latents(act_NF, fired_NF, unit_F, attr_NA, class_N) -> list[Pick]:
    """Per attribute, the latent with the largest |r| within class (module docstring, step 1)."""
    within_AF, plain_AF = correlations(act_NF, attr_NA, class_N), correlations(act_NF, attr_NA, None)
    picks = []
    for a, name in enumerate(ATTRIBUTES):
        f = int(np.abs(within_AF[a]).argmax())
        if within_AF[a, f] == 0:
            raise ValueError(
                f"no latent's activation varies with {name} within a class over the {len(act_NF)} probe samples "
                "(each class needs two samples or more); give more --probe-samples"
            )
        picks.append(
            Pick(
                name, f, float(within_AF[a, f]), float(plain_AF[a, f]), 1 if within_AF[a, f] >= 0 else -1,
                float(unit_F[f]), float(fired_NF[:, f].mean()),
            )
        )  # fmt: skip
    return picks


class Screened(NamedTuple):
    """What steering each candidate did to the screened samples."""

    latents: list[int]
    """(C,) the candidates, ascending."""
    change_CA: np.ndarray
    """Mean change of each attribute, steered minus unsteered on the same seed, in probe-sample sds."""
    kept_C: np.ndarray
    """Fraction of samples whose class the digit classifier still gives."""
    digit_like_C: np.ndarray
    """Fraction of samples as close to a real digit as the farthest unsteered one."""


def candidate_latents(within_AF: np.ndarray, n: int) -> list[int]:
    """The union over attributes of the n latents with the largest |within-class r|, ascending."""
    top_An = np.argsort(-np.abs(within_AF), axis=1, kind="stable")[:, :n]
    return sorted(set(top_An.ravel().tolist()))


def screen(
    draw_rows: Callable[[np.ndarray, list[int]], np.ndarray],
    latents: list[int],
    samples: np.ndarray,
    images0: np.ndarray,
    sd_A: np.ndarray,
    judge: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> Screened:
    """Steer every candidate on every sample: `draw_rows(samples_R, latents_R)` draws sample r with latent r
    steered up; `images0` are the samples unsteered; `judge(images)` -> (class, digit-like) per image."""
    n = len(samples)
    images = draw_rows(np.tile(samples, len(latents)), np.repeat(latents, n).tolist())
    attr0_NA, (pred0, _) = as_array(attributes(images0)), judge(images0)
    attr_CNA = as_array(attributes(images)).reshape(len(latents), n, -1)
    pred_CN, like_CN = (x.reshape(len(latents), n) for x in judge(images))
    with np.errstate(invalid="ignore"):
        change_CA = np.nanmean(attr_CNA - attr0_NA[None], axis=1) / sd_A[None]
    return Screened(latents, change_CA, (pred_CN == pred0[None]).mean(1), like_CN.mean(1))


def best_per_attribute(s: Screened) -> list[tuple[int, int, float]]:
    """Per attribute (ATTRIBUTES order): (latent, direction, screened change in sds) of the pick (step 3)."""
    ok_C = (s.kept_C >= MIN_KEPT) & (s.digit_like_C >= MIN_KEPT)
    out = []
    for a in range(len(ATTRIBUTES)):
        size_C = np.nan_to_num(np.abs(s.change_CA[:, a]), nan=-1.0)
        c = int(np.where(ok_C, size_C, -np.inf).argmax() if ok_C.any() else size_C.argmax())
        change = float(s.change_CA[c, a])
        out.append((s.latents[c], 1 if change >= 0 else -1, change))
    return out


def screen_table(s: Screened, picked: list[tuple[int, int, float]], unit_F: np.ndarray) -> dict[str, Any]:
    """The screen's figures for attributes.json: every candidate's (with its unit), and the picks'."""
    return {
        "min_kept": MIN_KEPT,
        "candidates": [
            {
                "latent": f,
                "unit": float(unit_F[f]),
                "class_kept": float(s.kept_C[c]),
                "digit_like": float(s.digit_like_C[c]),
                "change_sd": dict(zip(ATTRIBUTES, map(float, s.change_CA[c]), strict=True)),
            }
            for c, f in enumerate(s.latents)
        ],  # fmt: skip
        "picked": {name: p[0] for name, p in zip(ATTRIBUTES, picked, strict=True)},
    }


def pick_by_effect(
    activity: Activity,
    attr_NA: np.ndarray,
    class_N: np.ndarray,
    candidates: int,
    screen_on: Callable[[list[int]], Screened],
) -> tuple[list[Pick], dict[str, Any]]:
    """Steps 1-3 of the module docstring: `screen_on(latents)` screens the candidates (a `screen` call);
    returns the picks and the screen's figures."""
    act_NF, fired_NF, unit_F = activity
    within_AF, plain_AF = correlations(act_NF, attr_NA, class_N), correlations(act_NF, attr_NA, None)
    screened = screen_on(candidate_latents(within_AF, candidates))
    best = best_per_attribute(screened)
    picks = [
        Pick(name, f, float(within_AF[a, f]), float(plain_AF[a, f]), d, float(unit_F[f]),
             float(fired_NF[:, f].mean()), change)
        for a, (name, (f, d, change)) in enumerate(zip(ATTRIBUTES, best, strict=True))
    ]  # fmt: skip
    return picks, screen_table(screened, best, unit_F)


def pick_for_regions(
    activity: Activity,
    attr_NA: np.ndarray,
    class_N: np.ndarray,
    candidates: int,
    screen_on: Callable[[list[int]], Screened],
    signed: bool = False,
) -> tuple[list[Pick], dict[str, Any]]:
    """pick region (module docstring): every attribute's `candidates` best predictors screened by
    `screen_on`, the one that moves ink most steered in each attribute's REGION_OF (signed: added there and
    subtracted on its complement, pick push-pull); returns the picks and the screen's figures."""
    from tide.train.loop.regions import COMPLEMENT

    act_NF, fired_NF, unit_F = activity
    within_AF, plain_AF = correlations(act_NF, attr_NA, class_N), correlations(act_NF, attr_NA, None)
    ink = ATTRIBUTES.index("ink")
    screened = screen_on(candidate_latents(within_AF, candidates))
    ink_best = best_per_attribute(screened)[ink]
    f, ink_direction, change = ink_best
    picks = []
    for a, name in enumerate(ATTRIBUTES):
        region, sign = REGION_OF[name]
        region = f"{region}/{COMPLEMENT[region]}" if signed and region in COMPLEMENT else region
        picks.append(
            Pick(name, f, float(within_AF[a, f]), float(plain_AF[a, f]), ink_direction * sign, float(unit_F[f]),
                 float(fired_NF[:, f].mean()), change if name == "ink" else None, region)
        )  # fmt: skip
    table = screen_table(screened, [ink_best] * len(ATTRIBUTES), unit_F)
    return picks, table
