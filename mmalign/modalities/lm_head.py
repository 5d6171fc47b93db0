"""Answer-token log-probs without the (N, T, V) logits (issue 20, item 1).

    logp_t = head(h_t)[y_t] − logsumexp_v head(h_t)_v        for the answer tokens t only

The full path builds logits (N, T, V) for every position: at a 128k vocabulary, 16 × 1,024
positions are 8.4 GB of float32. Here the model runs with its output head swapped for a
`_Capture` that keeps the final hidden states h (N, T, H) and returns an empty (N, T, 0) tensor
(so whatever the model does to its logits afterwards costs nothing), then:

1. only the K answer positions are kept (prompt and padding never reach the head);
2. they go through the REAL head (a LoRA-wrapped head included) in chunks of `chunk` rows,
   each under non-reentrant activation checkpointing: a chunk's (chunk, V) logits live only
   while that chunk is computed, in the forward and again in the backward;
3. the model's own transform of its logits is applied in the chunk (`LogitTransform`: Gemma's
   final soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`).

Peak extra memory is one chunk's logits instead of N × T × V. The result is the full path's
(the same per-row operations), which `check_head` verifies once per model on a short slice:
a model whose head output goes through a transform not listed here falls back to full logits
with a warning instead of giving wrong numbers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mmalign.modalities.fast_paths import paths_agree


@dataclass(frozen=True)
class LogitTransform:
    """What the model does to head(h) before returning logits:
    logits = cap · tanh(z / cap) (cap set), z = scale · head(h) / divide."""

    scale: float = 1.0
    divide: float = 1.0
    cap: float | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.divide != 1.0:
            logits = logits / self.divide
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def logit_transform(config: Any) -> LogitTransform:
    """The logit transform of a transformers config (its text config for a VLM)."""
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    values = text.to_dict()
    return LogitTransform(scale=float(values.get("logit_scale") or 1.0),
                          divide=float(values.get("logits_scaling") or 1.0),
                          cap=values.get("final_logit_softcapping"))


class _Capture(torch.nn.Module):
    """Stands for the output head during one forward: keeps its input (the final hidden states)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        self.hidden = hidden
        return hidden[..., :0]


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / compile / peft wrappers (the one owning the head)."""
    import peft
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


@contextlib.contextmanager
def captured_hidden(model: torch.nn.Module) -> Iterator[tuple[_Capture, torch.nn.Module]]:
    """Within the block, `model(...)` returns empty logits and the capture holds the hidden
    states; yields (capture, the real head). The head is put back on exit, whatever happens."""
    base = language_model(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output head to chunk (set model.lm_head_chunk: 0)")
    capture = _Capture()
    base.set_output_embeddings(capture)
    try:
        yield capture, head
    finally:
        base.set_output_embeddings(head)


def _chunk(hidden: Tensor, labels: Tensor, head: torch.nn.Module, transform: LogitTransform,
           square: bool) -> tuple[Tensor, Tensor]:
    """(c, H), (c,) -> log-probs (c,) float32 and detached log Σ softmax² (c,) (zeros unless `square`)."""
    logits = transform(head(hidden)).float()
    norm = torch.logsumexp(logits, -1)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - norm
    if not square:
        return picked, torch.zeros_like(picked)
    with torch.no_grad():
        return picked, torch.logsumexp(2 * logits, -1) - 2 * norm


def chunked_token_logps(hidden: Tensor, head: torch.nn.Module, labels: Tensor, mask: Tensor, chunk: int,
                        transform: LogitTransform = LogitTransform(),
                        square: bool = False) -> tuple[Tensor, Tensor | None]:
    """Token log-probs of `labels` where `mask` is set, through `head` in chunks.

    hidden: (N, T, H) states that predict labels (N, T); mask: (N, T) bool or 0/1.
    Returns token_logps (N, T) float32 (0 off the mask) and, with `square`, the detached
    log Σ_v softmax_v² (N, T) (WPO), else None."""
    where = mask.bool()
    rows, ys = hidden[where], labels[where]  # (K, H), (K,)
    values, squares = [], []
    for start in range(0, rows.shape[0], chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled() and rows.requires_grad:
            lp, sq = checkpoint(_chunk, rows[part], ys[part], head, transform, square, use_reentrant=False)
        else:
            lp, sq = _chunk(rows[part], ys[part], head, transform, square)
        values.append(lp)
        squares.append(sq)
    out = hidden.new_zeros(mask.shape, dtype=torch.float32)
    if values:
        out = out.masked_scatter(where, torch.cat(values))
    if not square:
        return out, None
    sq_out = hidden.new_zeros(mask.shape, dtype=torch.float32)
    return out, sq_out.masked_scatter(where, torch.cat(squares)) if squares else sq_out


def check_head(model: torch.nn.Module, inputs: dict[str, Tensor], transform: LogitTransform) -> bool:
    """Whether the chunked path gives the model's own log-probs on the first row's first 16
    tokens (one short forward each way, `fast_paths.paths_agree`: max |Δ| ≤ 1e-4 · max(1, log V) with
    float32 weights, autocast off);
    False (with a warning) when the model transforms its logits in a way `LogitTransform` does
    not describe."""
    short = {k: v[:1, :16] for k, v in inputs.items()}

    def chunked() -> Tensor:
        with captured_hidden(model) as (capture, head):
            model(**short, use_cache=False)
            return transform(head(capture.hidden)).float().log_softmax(-1)

    return paths_agree(model, lambda: model(**short, use_cache=False).logits.float().log_softmax(-1), chunked, None,
                       lambda full: 1e-4 * max(1.0, math.log(full.shape[-1])),
                       f"model.lm_head_chunk: {type(language_model(model)).__name__} transforms its logits in a way "
                       "mmalign does not know; log-probs use the full logits")
