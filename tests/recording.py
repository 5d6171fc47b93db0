"""A stand-in for a diffusers transformer inside its own pipeline, shared by the family tests that
compare what the pipeline's denoising loop feeds the transformer with what mmalign's likelihood
feeds it on the same draw."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import torch


class RecordingTransformer(torch.nn.Module):
    """Records every call's keyword arguments (tensors cloned, `hidden_states` included) in `calls`
    and predicts 0, so the pipeline's Euler step leaves the latents unchanged. `config`: what the
    pipeline reads from the model's config (a class attribute in subclasses, or given)."""

    config: Any = SimpleNamespace()

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        self.weight, self.calls = torch.nn.Parameter(torch.zeros(1)), []
        if config is not None:
            self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def cache_context(self, name: str, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, hidden_states: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> tuple[torch.Tensor]:
        kept = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        self.calls.append(dict(kept, hidden_states=hidden_states.clone()))
        return (torch.zeros_like(hidden_states),)
