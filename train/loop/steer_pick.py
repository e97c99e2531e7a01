"""How `make steer-demo` picks each attribute's latent (train/loop/steer_demo.py, step 1): the per-sample mean
activation of every latent over the probe samples' stored rows, its Pearson r with each attribute within
class, and per attribute the latent with the largest |r|.

Shape key: N samples, S steps, T tokens, D width, F latents, A attributes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from tide.train.analysis.attributes import ATTRIBUTES
from tide.train.fit.checkpoint import LoadedSAE


class Pick(NamedTuple):
    """The latent chosen for one attribute."""

    attribute: str
    latent: int
    r_within: float
    """Pearson r of the latent's per-sample mean activation with the attribute, class means removed."""
    r: float
    """The same without removing class means (for comparison)."""
    direction: int
    """+1 or -1: the sign of r_within, the way the attribute should move when the latent goes up."""
    unit: float
    """The latent's mean activation where it fires (the steering strengths are multiples of it)."""
    fires: float
    """Fraction of the probe samples on which it fires at some stored row."""


@torch.no_grad()
def sample_activity(s: LoadedSAE, store, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, F) each sample's mean activation over its stored rows (the SAE's steps, every stored token), (N, F)
    whether it fired anywhere, and (F,) each latent's mean activation where it fires."""
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
    return mean_NF.numpy(), fired_NF.numpy(), (total_F / count_F.clamp_min(1)).numpy()


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
