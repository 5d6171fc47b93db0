"""DiffusionNFT's "old" policy (METHODS.md C.3; `NVlabs/DiffusionNFT` @24af555
`scripts/train_nft_sd3.py` `return_decay` and the end of each epoch).

A copy θ_old of the trainable weights (the LoRA adapters, or every trained weight for full
fine-tuning). It samples each round and gives v_old; when a round ends (after optimizer step k,
k counted from the start of the run as the official `global_step`):

    θ_old ← η_k·θ_old + (1 - η_k)·θ,     η_k = min(uprate·max(0, k - flat), uphold)

decay_type 0: η = 0 (old = current); 1 (default): uprate 0.001, flat 0, uphold 0.5;
2 (OCR): flat 75, uprate 0.0075, uphold 0.999. It is used by swapping its values into the
model's own parameters (`swapped`), so no second adapter or model copy runs; it is saved in
every checkpoint (`state_dict`) so a resumed run continues with the same θ_old.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# decay_type -> (flat, uprate, uphold), the official `return_decay` table
DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_decay(step: int, decay_type: int) -> float:
    """η_k = min(uprate·max(0, k - flat), uphold); e.g. type 1 at k 100 -> 0.1, at k 900 -> 0.5."""
    flat, uprate, uphold = DECAY_TYPES[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the parameters that train (requires_grad), in module order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class OldPolicy:
    """θ_old of `model`'s trained parameters (module docstring). decay_type: 0, 1 or 2."""

    def __init__(self, model: torch.nn.Module, decay_type: int) -> None:
        if decay_type not in DECAY_TYPES:
            raise ValueError(f"nft decay_type must be one of {sorted(DECAY_TYPES)}, got {decay_type}")
        self.decay_type = decay_type
        self.weights = {name: p.detach().clone() for name, p in trained_parameters(model).items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> float:
        """θ_old ← η·θ_old + (1 - η)·θ with η = old_decay(step); returns η."""
        eta = old_decay(step, self.decay_type)
        for name, p in trained_parameters(model).items():
            old = self.weights[name]
            old.copy_(old * eta + p.detach().to(old.dtype) * (1.0 - eta))
        return eta

    @contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`model` with θ_old in place of its trained weights, restored on exit (no autograd
        history is touched: call it outside a forward whose graph is kept)."""
        params = trained_parameters(model)
        current = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.weights[name])
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: θ_old} on the CPU (what a checkpoint keeps)."""
        return {name: w.detach().cpu().clone() for name, w in self.weights.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.weights) ^ set(state))
        if missing:
            raise ValueError(f"old policy state does not match the trained parameters: {missing[:3]}")
        for name, w in self.weights.items():
            w.copy_(state[name].to(w.device, w.dtype))
