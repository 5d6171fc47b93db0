"""Small tensor helpers shared by the modalities (torch only; nothing model-specific)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def right_pad_cat(tensors: Sequence[Tensor], value: float = 0) -> Tensor:
    """Concatenate along dim 0, right-padding every later dim with `value` to its longest:
    [(n_i, L_i, ...)] -> (Σ n_i, max L_i, ...). Rows already of the longest shape are used as
    they are; 1-D tensors are simply concatenated.

    The conditioning of several prompts, (1, L_i, D) each, becomes (n, max L, D); a padded
    attention-mask position is 0, so never attended. Per-image tensors of different sizes,
    (n_i, P_i, ...), share one block."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            out = t.new_full((t.shape[0], *shape), value)
            out[tuple(slice(0, s) for s in t.shape)] = t
            t = out
        padded.append(t)
    return torch.cat(padded)
