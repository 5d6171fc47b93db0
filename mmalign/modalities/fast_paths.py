"""Fast likelihood paths verified once per model (`data.padding_free`, `model.lm_head_chunk`).

A fast path (one packed row, the chunked LM head) must give the padded / full-logits path's
log-probs. Each likelihood checks that once per model, on its first batch:

    ok = allclose(fast, reference, atol, rtol)     both run in eval mode (dropout off), no grad

and keeps the verdict under id(language model); a model that fails keeps the reference path,
with a warning naming the config key. `paths_agree` is the comparison, `verified_once` the
per-model cache; `CausalLMLikelihood.paths`, `lm_head.check_head` and `LlavaLikelihood`'s two checks are built
from them (`packing.check_packing` has its own precision-aware comparison).
"""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

import torch
from torch import Tensor

from mmalign.nn import eval_mode

V = TypeVar("V")


def paths_agree(model: torch.nn.Module, reference: Callable[[], Tensor], fast: Callable[[], Tensor],
                atol: float | Callable[[Tensor], float], rtol: float, warning: str) -> bool:
    """allclose(fast(), reference(), atol, rtol), both computed without grad with `model` in eval
    mode (both forwards see the same network); `atol` a number or a function of the reference
    values. False, with `warning` (a UserWarning), when they differ."""
    with torch.no_grad(), eval_mode(model):
        want = reference()
        mine = fast()
    tolerance = atol(want) if callable(atol) else atol
    ok = bool(torch.allclose(want, mine, atol=tolerance, rtol=rtol))
    if not ok:
        warnings.warn(warning)
    return ok


def verified_once(cache: dict[int, V], key: int, verify: Callable[[], V]) -> V:
    """cache[key], computed by `verify()` the first time `key` (id of a language model) is seen."""
    if key not in cache:
        cache[key] = verify()
    return cache[key]
