"""Where on the image an edit acts: named regions of the image-token grid (`tide steer --region`).

A DiT cuts its latent image into patches, one token per patch, row by row (diffusers' `PatchEmbed` flattens
(h, w) in that order), so a site's N image tokens form a sqrt(N) x sqrt(N) grid: token n sits at row
n // sqrt(N), column n % sqrt(N). A region is a set of those tokens, taken from each token's centre as a
fraction of the grid (u the column, v the row, both in (0, 1), v growing downwards):

    all           every token (the edit as it is without --region)
    left, right   u < 1/2, u > 1/2
    top, bottom   v < 1/2, v > 1/2
    inner-cols    |u - 1/2| < 1/4: the middle half of the columns; outer-cols the rest
    inner-rows    |v - 1/2| < 1/4; outer-rows the rest
    diagonal      top-left and bottom-right quadrants (u - 1/2 and v - 1/2 of one sign)
    antidiagonal  top-right and bottom-left quadrants

A signed region `A/B` (two disjoint regions, e.g. `left/right`) is a push-pull: the edit is added on the
tokens of A and subtracted on those of B. With a latent that removes ink, `left/right` removes it on the
left and draws it on the right, so the digit moves rather than fades (docs/results.md, push-pull).

An edit restricted to a region adds its change on those tokens only and leaves the others bit for bit as
they were. Why regions: an edit that adds one vector to every token carries no spatial pattern, so it can
change how much is drawn but not where (docs/results.md, attribute steering).

Shape key: N tokens.
"""

from __future__ import annotations

import math

import torch

REGIONS: tuple[str, ...] = (
    "all", "left", "right", "top", "bottom", "inner-cols", "outer-cols", "inner-rows", "outer-rows",
    "diagonal", "antidiagonal",
)  # fmt: skip


COMPLEMENT: dict[str, str] = {
    "left": "right", "right": "left", "top": "bottom", "bottom": "top", "inner-cols": "outer-cols",
    "outer-cols": "inner-cols", "inner-rows": "outer-rows", "outer-rows": "inner-rows",
    "diagonal": "antidiagonal", "antidiagonal": "diagonal",
}  # fmt: skip
"""Each region's complement on a grid of even side: the signed region `A/COMPLEMENT[A]` edits every token."""


def check_region(name: str) -> str:
    """`name` when it is a region or a signed region `A/B` of two disjoint ones; else a ValueError."""
    parts = name.split("/")
    if len(parts) > 2 or any(p not in REGIONS for p in parts):
        raise ValueError(
            f"--region {name!r} is not a region tide knows: use one of {', '.join(REGIONS)}, or A/B for two "
            "disjoint ones (added on A, subtracted on B), e.g. left/right"
        )
    # Disjoint on a 4 x 4 grid is disjoint on every grid: the regions are strict inequalities of u and v.
    if len(parts) == 2 and (region_mask(parts[0], 16) & region_mask(parts[1], 16)).any():
        raise ValueError(
            f"--region {name!r}: {parts[0]} and {parts[1]} share tokens, where the edit would be both added "
            "and subtracted; pair two disjoint regions, e.g. left/right"
        )
    return name


def region_weights(name: str, num_tokens: int) -> torch.Tensor:
    """(N,) float32: 1 on the tokens of region `name`, 0 elsewhere; for a signed region A/B, +1 on A's tokens,
    -1 on B's, 0 elsewhere."""
    plus, _, minus = check_region(name).partition("/")
    w_N = region_mask(plus, num_tokens).float()
    return w_N - region_mask(minus, num_tokens).float() if minus else w_N


def region_mask(name: str, num_tokens: int) -> torch.Tensor:
    """(N,) bool: the tokens of region `name` (one region, unsigned) on a square grid of `num_tokens` tokens."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"--region {name!r} needs a square grid of image tokens, and this site has {num_tokens}; "
            "leave --region out to edit every token"
        )
    centre_S = (torch.arange(side, dtype=torch.float64) + 0.5) / side - 0.5  # -1/2 .. 1/2, 0 mid-grid
    v_N, u_N = centre_S.repeat_interleave(side), centre_S.repeat(side)  # row-major: row n // side
    masks = {
        "all": torch.ones(num_tokens, dtype=torch.bool),
        "left": u_N < 0,
        "right": u_N > 0,
        "top": v_N < 0,
        "bottom": v_N > 0,
        "inner-cols": u_N.abs() < 0.25,
        "outer-cols": u_N.abs() > 0.25,
        "inner-rows": v_N.abs() < 0.25,
        "outer-rows": v_N.abs() > 0.25,
        "diagonal": u_N * v_N > 0,
        "antidiagonal": u_N * v_N < 0,
    }
    if name not in masks:
        raise ValueError(f"--region {name!r} is not a region tide knows: use one of {', '.join(REGIONS)}")
    return masks[name]
