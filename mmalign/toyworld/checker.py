"""Exact programmatic checkers of the toy world (what the caption asks vs what is there).

Image side (`image_score`, METHODS.md §8): a 16×16 image against a caption "a red circle".
Every pixel is labelled with its nearest palette colour (background grey, red, green, blue,
yellow), or "other" when no palette colour is within `COLOUR_TOLERANCE` (blurry or mixed
colours). With M the pixels of the asked colour and N every non-background pixel:

    colour   = |M| / |N|                     (1: nothing but the asked colour was drawn)
    fill     = |M| / area of M's bounding box (square 1, circle ~0.78, triangle 0.5)
    shape    = clip(1 - max(0, |fill - FILL[shape]| - FILL_SLACK) / FILL_TOL, 0, 1)
    score    = colour · shape                 (0 when |M| < MIN_AREA pixels)

A clean render of the world scores exactly 1; a wrong colour 0; a triangle asked as a circle
0; a square asked as a circle 0.15.

Caption side (`caption_objects`, `chair`): the shapes a caption names (the world's object
categories) against the shapes in the scene; CHAIR_i = hallucinated mentions / mentions,
CHAIR_s = captions with a hallucinated shape / captions, recall = present shapes named /
present shapes. (The library's `mmalign eval chair` reads the COCO files instead; this is
the world's own exact reference.)
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from mmalign.scoring.base import Scorer
from mmalign.toyworld.world import BACKGROUND, COLOURS, SHAPES

PALETTE_NAMES: list[str] = ["background", *COLOURS]
PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float64)  # (5, 3)
COLOUR_TOLERANCE = 60.0  # Euclidean RGB distance to the nearest palette colour
FILL: dict[str, float] = {"circle": 0.78, "square": 1.0, "triangle": 0.5}
FILL_SLACK = 0.05  # rendered circles fill 0.75-0.80 of their box
FILL_TOL = 0.2
MIN_AREA = 9


def parse_caption(caption: str) -> tuple[str, str]:
    """(colour, shape) of an image-side caption "a red circle" (raises ValueError otherwise)."""
    words = caption.lower().replace(".", " ").split()
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in FILL]
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(f"caption {caption!r} does not name exactly one colour and one of {sorted(FILL)}")
    return colours[0], shapes[0]


def palette_labels(image: Any) -> np.ndarray:
    """(H, W) int: index into PALETTE_NAMES of each pixel's nearest palette colour, -1 when
    none is within COLOUR_TOLERANCE. `image`: PIL image or (H, W, 3) uint8 array."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    dist = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, 5)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > COLOUR_TOLERANCE] = -1
    return labels


def image_parts(image: Any, caption: str) -> dict[str, float]:
    """{"colour", "fill", "shape", "score", "area"} of `image` against `caption` (see module doc)."""
    return label_parts(palette_labels(image), *parse_caption(caption))


def label_parts(labels: np.ndarray, colour: str, shape: str) -> dict[str, float]:
    """`image_parts` from precomputed `palette_labels` (score one image against many captions)."""
    mask = labels == PALETTE_NAMES.index(colour)
    area = int(mask.sum())
    drawn = int((labels != 0).sum())
    if area < MIN_AREA:
        return {"colour": area / max(drawn, 1), "fill": 0.0, "shape": 0.0, "score": 0.0, "area": float(area)}
    ys, xs = np.nonzero(mask)
    fill = area / float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    match = float(np.clip(1.0 - max(0.0, abs(fill - FILL[shape]) - FILL_SLACK) / FILL_TOL, 0.0, 1.0))
    colour_fraction = area / drawn
    return {"colour": colour_fraction, "fill": fill, "shape": match, "score": colour_fraction * match,
            "area": float(area)}


def image_score(image: Any, caption: str) -> float:
    """Checker score in [0, 1] of one image against "a <colour> <shape>"."""
    return image_parts(image, caption)["score"]


def image_scores(images: Iterable[Any], captions: Sequence[str]) -> np.ndarray:
    """(N,) checker scores, one per (image, caption)."""
    return np.array([image_score(im, c) for im, c in zip(images, captions)], dtype=np.float64)


# -- captions ----------------------------------------------------------------------------
def caption_objects(text: str) -> list[str]:
    """Every shape named in `text`, in order (plural forms count): "a red circle and two
    squares" -> ["circle", "square"]."""
    found = []
    for word in text.lower().replace(".", " ").replace(",", " ").split():
        word = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if word in SHAPES:
            found.append(word)
    return found


def chair(captions: Sequence[str], present: Sequence[Iterable[str]]) -> dict[str, float]:
    """CHAIR_i, CHAIR_s and recall of `captions` against the shapes `present` in each image.

    chair_i = hallucinated mentions / all mentions; chair_s = captions with at least one
    hallucinated mention / captions; recall = present shapes named / present shapes."""
    mentions = hallucinated = bad_captions = named_present = total_present = 0
    for text, shapes in zip(captions, present, strict=True):
        shapes = set(shapes)
        named = caption_objects(text)
        wrong = [s for s in named if s not in shapes]
        mentions += len(named)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        named_present += len(shapes & set(named))
        total_present += len(shapes)
    return {"chair_i": hallucinated / max(mentions, 1), "chair_s": bad_captions / max(len(captions), 1),
            "recall": named_present / max(total_present, 1), "captions": float(len(captions))}


# -- as a scorer (`mmalign score --scorer toyworld_checker=score`) ---------------------------
class CheckerScorer(Scorer):
    """The exact image checker behind the ordinary Scorer contract, so `mmalign score` and
    `mmalign eval images` can rank and compare samples by it. PATH names the part returned:
    ``score`` (colour · shape, the default), ``colour`` or ``shape`` (see the module doc);
    nothing is loaded."""

    kinds = ("image",)
    PARTS = ("score", "colour", "shape")

    def __init__(self, path: str = "score", *, device: str = "cpu", batch_size: int = 64) -> None:
        from mmalign.errors import ConfigError

        super().__init__(device=device, batch_size=batch_size)
        if path not in self.PARTS:
            raise ConfigError(f"toyworld_checker: PATH must be one of {', '.join(self.PARTS)}, got {path!r}")
        self.part = path

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Any:
        import torch

        from mmalign.scoring.base import load_images

        images = load_images(outputs, "toyworld_checker")
        return torch.tensor([image_parts(im, c)[self.part] for im, c in zip(images, conditions)])
