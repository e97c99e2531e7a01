"""Pixel attributes (train/analysis/attributes.py) against hand-computed images and numpy's weighted moments."""

from __future__ import annotations

import numpy as np
import pytest
from tide.train.analysis.attributes import ATTRIBUTES, as_array, attributes


def _image(pixels: dict[tuple[int, int], int], H: int = 4, W: int = 5) -> np.ndarray:
    """(H, W, 1) uint8 with pixels[(x, y)] set."""
    img = np.zeros((H, W, 1), dtype=np.uint8)
    for (x, y), v in pixels.items():
        img[y, x, 0] = v
    return img


def test_attributes_of_hand_computed_images():
    # three full pixels at (x, y) = (1, 0), (2, 1), (3, 3): worked out by hand
    #   ink 3/20; centre (2, 4/3); var x = (1 + 0 + 1)/3 = 2/3; dy = -4/3, -1/3, 5/3, var y = 42/27 = 14/9;
    #   cov = (4/3 + 0 + 5/3)/3 = 1, so slant = 1 / (14/9) = 9/14 (moving right going down)
    a = attributes(_image({(1, 0): 255, (2, 1): 255, (3, 3): 255})[None])
    want = dict(
        ink=3 / 20,
        width=np.sqrt(2 / 3),
        height=np.sqrt(14) / 3,
        center_x=2.0,
        center_y=4 / 3,
        slant=9 / 14,
    )
    for name in ATTRIBUTES:
        assert getattr(a, name)[0] == pytest.approx(want[name], rel=1e-12), name
    # weights: w = 1 at (0, 0) and 51/255 = 0.2 at (4, 0): centre x = 0.8 / 1.2, var x = (4/9 + 0.2 * 100/9) / 1.2
    b = attributes(_image({(0, 0): 255, (4, 0): 51})[None])
    assert b.ink[0] == pytest.approx(1.2 / 20)
    assert b.center_x[0] == pytest.approx(2 / 3) and b.center_y[0] == 0
    assert b.width[0] == pytest.approx(np.sqrt(20) / 3) and b.height[0] == 0
    assert np.isnan(b.slant[0])  # no vertical spread: slant is undefined
    # mirrored left-right, the slant changes sign; a blank image has ink 0 and no weighted moments
    m = attributes(_image({(3, 0): 255, (2, 1): 255, (1, 3): 255})[None])
    assert m.slant[0] == pytest.approx(-9 / 14) and m.width[0] == pytest.approx(np.sqrt(2 / 3))
    blank = attributes(np.zeros((1, 4, 5, 1), dtype=np.uint8))
    assert blank.ink[0] == 0 and np.isnan(as_array(blank)[0, 1:]).all()


def test_attributes_match_numpy_weighted_moments():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 12, 3), dtype=np.uint8)
    got = as_array(attributes(images))
    assert got.shape == (6, 6)
    ys, xs = np.mgrid[0:16, 0:12]
    for i, img in enumerate(images):
        w = img.astype(np.float64).mean(-1).ravel() / 255  # channels averaged
        cov = np.cov(np.stack([xs.ravel(), ys.ravel()]), aweights=w, bias=True)
        want = [
            w.mean(),
            np.sqrt(cov[0, 0]),
            np.sqrt(cov[1, 1]),
            np.average(xs.ravel(), weights=w),
            np.average(ys.ravel(), weights=w),
            cov[0, 1] / cov[1, 1],
        ]
        np.testing.assert_allclose(got[i], want, rtol=1e-10)


def test_attributes_refuse_other_shapes():
    with pytest.raises(ValueError, match=r"expected \(B, H, W, C\)"):
        attributes(np.zeros((4, 5), dtype=np.uint8))
