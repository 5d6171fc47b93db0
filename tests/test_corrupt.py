"""Image corruptions (mmalign.data.corrupt): DDPM noise, random resized crop, pixel/patch
masking -- hand-checked values, exact counts, determinism in the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.corrupt import (
    CORRUPTIONS, corrupt_image, crop_box, crop_image, ddpm_alphas_cumprod, mask_image, noise_image,
)


def grey(size: int = 16, value: int = 200) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def test_ddpm_schedule_values():
    abar = ddpm_alphas_cumprod()
    assert abar.shape == (1000,)
    assert float(abar[0]) == pytest.approx(1 - 1e-4)  # β_0 = 1e-4
    assert float(abar[499].sqrt()) == pytest.approx(0.28033, abs=1e-5)  # POVID's t = 500: mostly noise
    assert float(abar[999]) == pytest.approx(4.036e-5, rel=1e-3)


def test_noise_follows_the_forward_process():
    image = grey(16, 191)  # 191 / 127.5 - 1 = 0.498...
    out = pixels(noise_image(image, 7, step=499))
    # the same draw, written out: x_t = √ᾱ x + √(1-ᾱ) ε with ε from the seeded generator
    eps = torch.randn((16, 16, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
    x = 191 / 127.5 - 1
    expected = np.clip(0.2803341628873981 * x + np.sqrt(1 - 0.2803341628873981**2) * eps, -1, 1)
    np.testing.assert_array_equal(out, np.round((expected + 1) * 127.5).astype(np.int64))
    # step 0 barely changes the image (noise std 0.01 in [-1, 1] = 1.3 grey levels)
    assert np.abs(pixels(noise_image(image, 7, step=0)) - 191).mean() < 2.5
    with pytest.raises(ValueError, match=r"noise step must be in \[0, 999\], got 1000"):
        noise_image(image, 0, step=1000)


def test_crop_keeps_one_to_twenty_percent_of_the_area():
    for seed in range(50):
        left, top, w, h = crop_box(100, 80, seed)
        assert 0.01 * 8000 * 0.9 <= w * h <= 0.2 * 8000 * 1.1  # rounding of w, h
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 80
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
    # the image is that box, resized back to the original size
    gradient = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (80, 1, 3)))
    left, top, w, h = crop_box(100, 80, 3)
    out = crop_image(gradient, 3)
    assert out.size == (100, 80)
    expected = gradient.crop((left, top, left + w, top + h)).resize((100, 80), Image.BICUBIC)
    np.testing.assert_array_equal(pixels(out), pixels(expected))
    assert pixels(out).min() >= left - 2 and pixels(out).max() <= left + w + 1  # only columns of the box


def test_mask_counts_pixels_and_patches():
    out = pixels(mask_image(grey(10, 255), 5, ratio=0.3))
    assert (out.sum(-1) == 0).sum() == 30 and (out == 255).all(-1).sum() == 70  # 30% of 100 pixels
    # 8x8 image, 4x4 patches: 4 cells, half of them masked -> 2 whole squares = 32 pixels
    out = pixels(mask_image(grey(8, 255), 5, ratio=0.5, patch=4))
    black = out.sum(-1) == 0
    assert black.sum() == 32
    cells = black.reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16)
    assert sorted(cells.sum(-1).tolist()) == [0, 0, 16, 16]  # each cell all black or untouched


def test_same_seed_same_image_and_generators_work():
    from mmalign.toyvlm import draw_shape

    image = draw_shape("red", "circle")
    for kind in CORRUPTIONS:
        a, b = corrupt_image(image, kind, 11), corrupt_image(image, kind, torch.Generator().manual_seed(11))
        np.testing.assert_array_equal(pixels(a), pixels(b))
        assert a.size == image.size and a.mode == "RGB"
        assert not np.array_equal(pixels(a), pixels(image))
    assert not np.array_equal(pixels(noise_image(image, 1)), pixels(noise_image(image, 2)))
    with pytest.raises(ValueError, match="unknown corruption 'blur'; known: noise, crop, mask"):
        corrupt_image(image, "blur", 0)
