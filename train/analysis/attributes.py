"""What an image shows, measured from its pixels: six attributes of a drawn digit.

With x the column, y the row (0 at the top, so y grows downwards) and w the pixel intensity scaled to [0, 1]
(uint8 / 255, averaged over the channels), each image gets:

    ink        mean of w                                   how much is drawn
    width      w-weighted std of x                         horizontal spread, in pixels
    height     w-weighted std of y                         vertical spread, in pixels
    center_x   w-weighted mean of x                        where the ink sits, in pixels from the left
    center_y   w-weighted mean of y                        ... in pixels from the top
    slant      w-weighted cov(x, y) / var(y)               columns moved per row going down: positive leans
                                                           like a backslash, negative like a forward slash

An image with no ink has no weighted moments: its five weighted attributes are NaN.
Shape key: B images, H rows, W columns, C channels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Attributes(NamedTuple):
    """(B,) float64 values of each attribute, one per image."""

    ink: np.ndarray
    width: np.ndarray
    height: np.ndarray
    center_x: np.ndarray
    center_y: np.ndarray
    slant: np.ndarray


ATTRIBUTES: tuple[str, ...] = Attributes._fields
UNITS = {
    "ink": "of full intensity",
    "width": "px",
    "height": "px",
    "center_x": "px",
    "center_y": "px",
    "slant": "px/px",
}
"""What one unit of each attribute is."""


def attributes(images_BHWC: np.ndarray) -> Attributes:
    """The attributes of uint8 images (B, H, W, C)."""
    if images_BHWC.ndim != 4:
        raise ValueError(f"images of shape {images_BHWC.shape}: expected (B, H, W, C)")
    w_BHW = images_BHWC.astype(np.float64).mean(-1) / 255
    _, H, W = w_BHW.shape
    y_H1, x_1W = np.arange(H, dtype=np.float64)[:, None], np.arange(W, dtype=np.float64)[None, :]
    mass_B = w_BHW.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_BHW = w_BHW / mass_B[:, None, None]  # weights summing to 1 per image
        cx_B, cy_B = (p_BHW * x_1W).sum((1, 2)), (p_BHW * y_H1).sum((1, 2))
        dx_BHW = x_1W - cx_B[:, None, None]
        dy_BHW = y_H1 - cy_B[:, None, None]
        var_x_B, var_y_B = (p_BHW * dx_BHW**2).sum((1, 2)), (p_BHW * dy_BHW**2).sum((1, 2))
        cov_B = (p_BHW * dx_BHW * dy_BHW).sum((1, 2))
        slant_B = cov_B / var_y_B
    return Attributes(
        ink=w_BHW.mean((1, 2)),
        width=np.sqrt(var_x_B),
        height=np.sqrt(var_y_B),
        center_x=cx_B,
        center_y=cy_B,
        slant=slant_B,
    )


def as_array(a: Attributes) -> np.ndarray:
    """(B, 6) the attributes side by side, in ATTRIBUTES order."""
    return np.stack(a, axis=1)
