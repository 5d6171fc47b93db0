"""A programmatic text scorer for tests and tiny demos (`text_length=words`): no model loaded.

PATH names what is counted in each answer: ``words`` (whitespace-separated words) or ``chars``
(characters, surrounding whitespace stripped). Option `target=N` scores -|count - N| instead
(closest to N is best). Not a quality measure: it exists so online rounds and `mmalign score`
can be exercised on text without a reward model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError
from mmalign.scoring.base import Scorer

UNITS = ("words", "chars")


class TextLengthScorer(Scorer):
    """score(prompts, answers) -> (N,) float32: each answer's length in `path` units, or
    -|length - target| with `target` >= 0."""

    kinds = ("text",)

    def __init__(self, path: str = "words", *, target: int = -1, device: str = "cpu", batch_size: int = 64) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if path not in UNITS:
            raise ConfigError(f"text_length: PATH must be one of {', '.join(UNITS)}, got {path!r}")
        self.unit, self.target = path, int(target)

    def _count(self, text: Any) -> int:
        text = str(text).strip()
        return len(text.split()) if self.unit == "words" else len(text)

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        counts = torch.tensor([float(self._count(o)) for o in outputs])
        return -(counts - self.target).abs() if self.target >= 0 else counts
