"""Fast likelihood paths verified once per model (`data.padding_free`, `model.lm_head_chunk`).

A fast path (one packed row, the chunked LM head) must give the padded / full-logits path's
log-probs. Each likelihood checks that once per model, on its first batch, comparing the two
paths' log-probs at the checked positions:

    float32 weights:   max |fast - reference| <= atol        (1e-4 per token, or as the check says)
    16-bit weights:    mean |fast - reference| <= 2e-2      (two kernel paths differ by rounding)

Both run without grad, in eval mode (dropout off: both forwards see the same network) and with
autocast OFF: under bf16 mixed precision the float32 master weights are compared, so the check
tests the math, not bf16 rounding (two bf16 kernel paths differ by ~1e-3 per token, which grows
with size and would send every GPU run to the slow path). The tolerance is per token and does
not grow with the batch: a wrong fast path (e.g. a packed row with wrong positions) is off by
~1e-2 to 1e-1 on every token however many there are. A model that fails keeps the reference path,
with a warning naming the config key. `paths_agree` runs the comparison, `agree` is its rule,
`verified_once` the per-model cache; `CausalLMLikelihood.paths` (`packing.check_packing`,
`lm_head.check_head`) and `LlavaLikelihood`'s two checks are built from them.
"""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

import torch
from torch import Tensor

from mmalign.nn import eval_mode

V = TypeVar("V")

LOW_PRECISION_MEAN_GAP = 2e-2  # mean |Δ| per token allowed with 16-bit weights


def has_16bit_weights(model: torch.nn.Module) -> bool:
    """Whether any floating weight of `model` is float16 / bfloat16 (a bf16 base under fp32 LoRA
    adapters counts: its forwards round to 16 bits)."""
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())


def agree(reference: Tensor, fast: Tensor, where: Tensor | None, atol: float, low_precision: bool) -> bool:
    """The check's rule on log-probs `reference`, `fast` (same shape) at positions `where` (bool,
    broadcastable; None: all): max |Δ| <= atol, or with 16-bit weights mean |Δ| <= 2e-2. No
    position to compare agrees."""
    gap = (fast.float() - reference.float()).abs()
    gap = gap if where is None else gap[where.expand_as(gap)]
    if gap.numel() == 0:
        return True
    return bool(gap.mean() <= LOW_PRECISION_MEAN_GAP) if low_precision else bool(gap.max() <= atol)


def paths_agree(model: torch.nn.Module, reference: Callable[[], Tensor], fast: Callable[[], Tensor],
                where: Tensor | None, atol: float | Callable[[Tensor], float], warning: str) -> bool:
    """`agree(reference(), fast(), where, atol, 16-bit weights?)`, both computed without grad,
    with `model` in eval mode and autocast off; `atol` a number or a function of the reference
    values. False, with `warning` (a UserWarning), when they differ."""
    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model), torch.autocast(device.type, enabled=False):
        want = reference()
        mine = fast()
    tolerance = atol(want) if callable(atol) else atol
    ok = agree(want, mine, where, tolerance, has_16bit_weights(model))
    if not ok:
        warnings.warn(warning)
    return ok


def verified_once(cache: dict[int, V], key: int, verify: Callable[[], V]) -> V:
    """cache[key], computed by `verify()` the first time `key` (id of a language model) is seen."""
    if key not in cache:
        cache[key] = verify()
    return cache[key]
