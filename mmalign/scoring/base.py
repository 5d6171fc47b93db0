"""The Scorer contract and the small helpers every scorer shares (DESIGN.md, "Scorer").

A scorer loads from a local path, pkg://NAME or a Hub id (mmalign/hub.py) and maps N (condition, output) pairs to N
numbers: `score(conditions, outputs) -> Tensor (N,)`, float32 on the CPU, NaN where it could
not score (e.g. a judge answer that did not parse). Higher is better for every scorer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'float16' -> torch.float16; None -> float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"scorer dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def require_path(path: str | Path, what: str, files: list[str] | None = None) -> Path:
    """`path` as a Path: a local file or folder, pkg://NAME, or a Hub id org/name[@revision]
    (its snapshot folder, mmalign/hub.py, holding only the `files` patterns when given); a
    ConfigError naming `what` when it does not exist."""
    from mmalign.hub import resolve_path

    p = Path(resolve_path(str(path), what, files)).expanduser()
    if not p.exists():
        raise ConfigError(f"{what}: {p} does not exist (give a local file or folder, pkg://NAME or a Hub id)")
    return p


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices [0:size], [size:2*size], ... covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def features(out: Any) -> Tensor:
    """The projected embedding of a transformers `get_*_features` call: a Tensor in
    transformers 4.x, a ModelOutput whose `pooler_output` holds it in 5.x."""
    return out if isinstance(out, Tensor) else out.pooler_output


def load_images(outputs: Sequence[Any], where: str) -> list[Any]:
    """RGB PIL images from PIL images or file paths (`mmalign.data.media.load_image`)."""
    from mmalign.data.media import load_image

    return [load_image(o, f"{where}, output {i}") for i, o in enumerate(outputs)]


class Scorer:
    """Base class: `score` checks lengths and runs `_score_batch` on chunks of `batch_size`.

    kinds: the manifest sample kinds the scorer accepts ("image", "audio", "text").
    groupwise: True when a row's score depends on the other samples of its prompt (the
        pairwise judge ranks them against each other); `mmalign score` then always scores
        whole prompt groups together.
    wraps_scorer: True when the options `__init__` does not name go to a scorer it loads, which
        checks them (`video_frames`); otherwise an unknown option is refused at load.
    """

    kinds: tuple[str, ...] = ("image",)
    groupwise: bool = False
    wraps_scorer: bool = False

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ConfigError(f"scorer batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    def score(self, conditions: Sequence[str], outputs: Sequence[Any]) -> Tensor:
        """conditions: N prompts; outputs: N samples (PIL image / path / audio / text) -> (N,) float32."""
        if len(conditions) != len(outputs):
            raise ValueError(f"{len(conditions)} conditions for {len(outputs)} outputs")
        if not outputs:
            return torch.zeros(0)
        parts = [self._score_batch(list(conditions[s]), list(outputs[s]))
                 for s in chunks(len(outputs), self.batch_size)]
        return torch.cat([p.detach().float().cpu() for p in parts])

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        raise NotImplementedError

    @classmethod
    def is_groupwise(cls, options: dict[str, Any]) -> bool:
        """Whether a scorer built with these spec options scores whole prompt groups."""
        return cls.groupwise

    def stats(self) -> dict[str, int]:
        """Counters for the summary line (e.g. unparsed judge answers); empty by default."""
        return {}


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of (N, D) and (N, D) -> (N,), in float32."""
    a, b = a.float(), b.float()
    return ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


def unique_texts(texts: Sequence[str]) -> tuple[list[str], Tensor]:
    """Distinct texts (first-seen order) and, per input, its index among them: N samples of a
    prompt share one text embedding."""
    order: dict[str, int] = {}
    index = [order.setdefault(t, len(order)) for t in texts]
    return list(order), torch.tensor(index, dtype=torch.long)
