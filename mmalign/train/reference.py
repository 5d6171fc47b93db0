"""Reference-model strategies (METHODS.md §3). Each exposes `logps(batch, draw)` and
scores under `torch.inference_mode`, with dropout off, on the SAME draw as the policy."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor

from mmalign.nn import eval_mode
from mmalign.types import Draw, Likelihood, LogpOutput, PreferenceBatch

__all__ = ["FrozenReference", "LoraDisabledReference", "PrecomputedReference", "eval_mode"]


def _score(likelihood: Likelihood, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw,
           autocast: Any) -> LogpOutput:
    with torch.inference_mode(), eval_mode(model), autocast():
        out = likelihood.logps(model, batch, draw)
    # Inference tensors cannot be saved for backward; clone into normal tensors.
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    transition = None if out.transition is None else (out.transition[0].clone(), out.transition[1].clone())
    return LogpOutput(out.logps.clone(), clone(out.tokens), clone(out.token_logps), clone(out.token_mask),
                      {k: v.clone() for k, v in out.diagnostics.items()}, transition=transition)


def _predict(fn: Callable[[torch.nn.Module], tuple[Tensor, ...]], model: torch.nn.Module,
             autocast: Any) -> tuple[Tensor, ...]:
    """fn(model) under inference mode, dropout off, autocast; the tensors cloned for autograd."""
    with torch.inference_mode(), eval_mode(model), autocast():
        out = fn(model)
    return tuple(t.clone() for t in out)


class FrozenReference:
    """A frozen copy of the initial policy (full fine-tuning). `sync` implements TR-DPO:
    ref <- (1 - alpha) ref + alpha policy."""

    def __init__(self, model: torch.nn.Module, likelihood: Likelihood, autocast: Any,
                 device: torch.device | str = "cpu") -> None:
        # The copy goes to the training device itself: accelerate's prepare() moves only the policy.
        self.model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.likelihood, self.autocast = likelihood, autocast

    def logps(self, batch: PreferenceBatch, draw: Draw) -> LogpOutput:
        return _score(self.likelihood, self.model, batch, draw, self.autocast)

    def predict(self, fn: Callable[[torch.nn.Module], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """fn(reference model) (DiffusionNFT's v_ref), as `logps` scores."""
        return _predict(fn, self.model, self.autocast)

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, alpha: float) -> None:
        for ref_p, p in zip(self.model.parameters(), policy.parameters(), strict=True):
            ref_p.lerp_(p.detach().to(ref_p.dtype), alpha)

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module) -> None:
        """ref <- policy exactly (parameters and buffers; online.reference_update every_round)."""
        self.model.load_state_dict(policy.state_dict())


class LoraDisabledReference:
    """The policy's base weights with its LoRA adapters switched off: no second copy."""

    def __init__(self, peft_model: torch.nn.Module, likelihood: Likelihood, autocast: Any) -> None:
        self.model, self.likelihood, self.autocast = peft_model, likelihood, autocast

    def logps(self, batch: PreferenceBatch, draw: Draw) -> LogpOutput:
        with self.model.disable_adapter():
            return _score(self.likelihood, self.model, batch, draw, self.autocast)

    def predict(self, fn: Callable[[torch.nn.Module], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """fn(the adapters-off model) (DiffusionNFT's v_ref), as `logps` scores."""
        with self.model.disable_adapter():
            return _predict(fn, self.model, self.autocast)


class PrecomputedReference:
    """Reference log-likelihoods computed once before training and carried by the batch."""

    def logps(self, batch: PreferenceBatch, draw: Draw) -> LogpOutput:
        if batch.ref_logps is None:
            raise RuntimeError("precomputed reference: the batch carries no reference log-likelihoods")
        return LogpOutput(batch.ref_logps.float())
