"""Image corruptions for vision-language hallucination training (METHODS.md §4).

A corrupted image m' keeps the prompt and answer but removes most of the visual evidence, so
an answer that still scores well on m' leans on language priors, not on the image:

- `noise`: forward diffusion to step t of T = 1000 with the DDPM linear schedule
  (β_t from 1e-4 to 0.02, Ho et al. 2020): x_t = √ᾱ_t x + √(1 - ᾱ_t) ε, pixels in [-1, 1]
  (POVID stage 2 uses t = 500, where √ᾱ_t ≈ 0.28: the image is mostly noise);
- `crop`: a random resized crop keeping 1-20% of the area (aspect ratio in [3/4, 4/3]),
  resized back to the original size (mDPO's default corruption);
- `mask`: a fraction (30%) of the pixels, or of the `patch` x `patch` cells, set to black.

Every function takes and returns a PIL RGB image (same size) and draws all its randomness
from the `generator` it is given (a `torch.Generator` or an int seed): the same seed gives
the same corrupted image, on any machine. `corrupt_image(image, kind, generator, **params)`
picks one by name from `CORRUPTIONS`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_NOISE_STEP = 500
DEFAULT_CROP_SCALE = (0.01, 0.2)
DEFAULT_MASK_RATIO = 0.3


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU `torch.Generator`: the one given, or a new one seeded with the int (0 for None)."""
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator or 0))


def ddpm_alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s) of the DDPM linear schedule, (num_steps,) float64."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _to_tensor(image: Any) -> torch.Tensor:
    """PIL -> (H, W, 3) float64 in [0, 255]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64))


def _to_image(pixels: torch.Tensor) -> Any:
    from PIL import Image

    return Image.fromarray(pixels.round().clamp(0, 255).to(torch.uint8).numpy())  # (H, W, 3) uint8: RGB


def noise_image(image: Any, generator: torch.Generator | int | None = None, *,
                step: int = DEFAULT_NOISE_STEP) -> Any:
    """Forward-diffuse `image` to DDPM step `step` (0-based, of 1000):
    x_t = √ᾱ_t x + √(1 - ᾱ_t) ε, x the pixels scaled to [-1, 1], ε ~ N(0, I) of shape (H, W, 3);
    the result is clipped back to [0, 255]."""
    if not 0 <= step < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"noise step must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {step}")
    x = _to_tensor(image) / 127.5 - 1.0
    alpha_bar = ddpm_alphas_cumprod()[step]
    eps = torch.randn(x.shape, generator=as_generator(generator), dtype=torch.float64)
    noisy = alpha_bar.sqrt() * x + (1.0 - alpha_bar).sqrt() * eps
    return _to_image((noisy.clamp(-1.0, 1.0) + 1.0) * 127.5)


def crop_box(width: int, height: int, generator: torch.Generator | int | None = None, *,
             scale: tuple[float, float] = DEFAULT_CROP_SCALE,
             ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop whose area is a fraction in `scale` of the image and
    whose aspect ratio w/h is in `ratio` (log-uniform), as torchvision's RandomResizedCrop;
    after `attempts` misses, the centred largest crop of the smallest area that fits."""
    g = as_generator(generator)
    area = width * height
    uniform = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))  # noqa: E731
    for _ in range(attempts):
        target = area * uniform(*scale)
        aspect = math.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            return left, top, w, h
    side = max(1, round(math.sqrt(area * scale[0])))
    w, h = min(side, width), min(side, height)
    return (width - w) // 2, (height - h) // 2, w, h


def crop_image(image: Any, generator: torch.Generator | int | None = None, *,
               scale: tuple[float, float] = DEFAULT_CROP_SCALE) -> Any:
    """A random resized crop keeping `scale` (default 1-20%) of the area, resized back to the
    original size (bicubic)."""
    from PIL import Image

    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
    image = image.convert("RGB")
    left, top, w, h = crop_box(image.width, image.height, generator, scale=tuple(scale))
    return image.crop((left, top, left + w, top + h)).resize(image.size, Image.BICUBIC)


def mask_image(image: Any, generator: torch.Generator | int | None = None, *,
               ratio: float = DEFAULT_MASK_RATIO, patch: int = 1) -> Any:
    """Set round(ratio · cells) randomly chosen cells to black: single pixels (`patch` 1) or
    `patch` x `patch` squares of a grid laid from the top-left corner (edge cells may be smaller)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if patch < 1:
        raise ValueError(f"mask patch must be >= 1, got {patch}")
    pixels = _to_tensor(image)
    rows, cols = math.ceil(pixels.shape[0] / patch), math.ceil(pixels.shape[1] / patch)
    chosen = torch.randperm(rows * cols, generator=as_generator(generator))[: round(ratio * rows * cols)]
    cells = torch.zeros(rows * cols, dtype=torch.bool)
    cells[chosen] = True
    mask = cells.view(rows, cols).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    pixels[mask[: pixels.shape[0], : pixels.shape[1]]] = 0.0
    return _to_image(pixels)


CORRUPTIONS: dict[str, Callable[..., Any]] = {"noise": noise_image, "crop": crop_image, "mask": mask_image}


def corrupt_image(image: Any, kind: str, generator: torch.Generator | int | None = None, **params: Any) -> Any:
    """Apply the corruption `kind` (noise, crop, mask) with its keyword parameters."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[kind](image, generator, **params)
