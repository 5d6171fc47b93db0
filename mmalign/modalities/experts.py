"""Two denoisers switched at a timestep boundary (Wan 2.2 A14B: `transformer` for high noise,
`transformer_2` for low noise), trained as one module.

The pipeline's switch (diffusers 0.42.1 WanPipeline.__call__): with boundary b = boundary_ratio ·
num_train_timesteps, step t is denoised by `transformer` when t >= b, else by `transformer_2`.
`TwoExperts.forward` applies the same rule per row of a batch, on the timestep the denoiser call
gives (σ·1000 for Wan), so the policy and the reference (adapters off) use, for a drawn σ, the
expert that sampling at that σ uses:

    v_θ(x_t, t, c) = transformer(x_t, t, c)    if t >= b
                     transformer_2(x_t, t, c)  otherwise

Trained experts (`trained`, "high" / "low") are registered submodules (peft puts LoRA on them, the
optimizer sees them, checkpoints hold them); an expert left out is kept frozen OUTSIDE the module
tree (moved with `.to`, invisible to peft, `parameters()` and `state_dict()`), so training one
expert is the same run as training a single transformer at the timesteps it serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

NAMES = {"high": "transformer", "low": "transformer_2"}  # expert -> its pipeline component
SETTINGS_FILE = "experts.json"


class TwoExperts(torch.nn.Module):
    """`transformer` (t >= boundary) and `transformer_2` (t < boundary) as one denoiser (module docstring).

    high, low: the two denoisers; boundary: b = boundary_ratio · num_train_timesteps; trained: the
    experts that train ("high", "low")."""

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary: float, boundary_ratio: float,
                 trained: tuple[str, ...] = ("high", "low")) -> None:
        super().__init__()
        self.boundary, self.boundary_ratio, self.trained = float(boundary), float(boundary_ratio), tuple(trained)
        self._frozen: dict[str, torch.nn.Module] = {}  # a plain dict: not a registered submodule
        for expert, module in (("high", high), ("low", low)):
            if expert in self.trained:
                setattr(self, NAMES[expert], module)
            else:
                self._frozen[NAMES[expert]] = module.requires_grad_(False).eval()

    def __deepcopy__(self, memo: dict[int, Any]) -> "TwoExperts":
        """A copy whose trained experts are copies and whose frozen expert is the same module (a frozen
        reference copy of the policy must not duplicate an expert that never changes)."""
        import copy

        for module in self._frozen.values():
            memo[id(module)] = module
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        return new

    def components(self) -> dict[str, torch.nn.Module]:
        """{"transformer": high, "transformer_2": low}, trained or frozen (peft-injected in place)."""
        modules = dict(self.named_children())
        return {name: modules[name] if name in modules else self._frozen[name] for name in NAMES.values()}

    def pipeline_parts(self) -> dict[str, Any]:
        """The WanPipeline keyword arguments of this denoiser: both experts and boundary_ratio."""
        return {**self.components(), "boundary_ratio": self.boundary_ratio}

    def enable_gradient_checkpointing(self) -> None:
        """`model.gradient_checkpointing`: each expert recomputes its activations in backward."""
        for module in self.components().values():
            module.enable_gradient_checkpointing()

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "TwoExperts":
        """`.to` / `.cuda` / `.half` reach the frozen expert too."""
        for module in self._frozen.values():
            module._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                return_dict: bool = False, **kwargs: Any) -> tuple[Tensor]:
        """(v (N, C, f, h, w),): row i through `transformer` when timestep[i] >= boundary, else
        `transformer_2`. timestep (N,); tensor keyword arguments (I2V image states) are split by row
        too. A trained expert that gets no row adds 0·(its parameters), so it always has a (zero)
        gradient: every process of a data-parallel run reduces the same parameters and one process
        steps its optimizer as two do."""
        high = timestep >= self.boundary
        out: Tensor | None = None
        experts = self.components()
        for rows, module in ((high, experts["transformer"]), (~high, experts["transformer_2"])):
            index = rows.nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            rows_kwargs = {k: v[index] if isinstance(v, Tensor) else v for k, v in kwargs.items()}  # I2V image_embeds
            pred = module(hidden_states=hidden_states[index], timestep=timestep[index],
                          encoder_hidden_states=encoder_hidden_states[index], return_dict=False, **rows_kwargs)[0]
            out = pred.new_zeros((hidden_states.shape[0], *pred.shape[1:])) if out is None else out
            out = out.index_copy(0, index, pred)
        assert out is not None  # N >= 1 rows go to one expert or the other
        for expert, rows in (("high", high), ("low", ~high)):
            if expert in self.trained and not rows.any():
                module = getattr(self, NAMES[expert])
                out = out + 0.0 * sum(p.reshape(-1)[0] for p in module.parameters() if p.requires_grad)
        return (out,)

    # -- a full fine-tune's folder (train's final/, `mmalign export --format unet`) -----------------
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """path/transformer, path/transformer_2 (`save_pretrained` of each) and path/experts.json."""
        path = Path(path)
        for name, module in self.components().items():
            module.save_pretrained(str(path / name), **kwargs)
        settings = {"boundary": self.boundary, "boundary_ratio": self.boundary_ratio, "trained": list(self.trained)}
        (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None,
                        dtype: torch.dtype | None = None) -> "TwoExperts":
        """What `save_pretrained` wrote, the experts in `torch_dtype` (or `dtype`)."""
        from diffusers import WanTransformer3DModel

        path = Path(path)
        settings = json.loads((path / SETTINGS_FILE).read_text())
        high, low = (WanTransformer3DModel.from_pretrained(str(path / NAMES[e]), torch_dtype=torch_dtype or dtype)
                     for e in ("high", "low"))
        return cls(high, low, settings["boundary"], settings["boundary_ratio"], tuple(settings["trained"]))


def denoiser_components(model: torch.nn.Module, component: str) -> dict[str, torch.nn.Module]:
    """The pipeline components a (merged, unwrapped) trained denoiser fills: {component: model}, or
    both experts of a `TwoExperts`."""
    return model.components() if isinstance(model, TwoExperts) else {component: model}


def split_lora_state(state: dict[str, Tensor], model: torch.nn.Module) -> dict[str, dict[str, Tensor]]:
    """LoRA weights (keys without peft's prefix) per pipeline component: a `TwoExperts`' keys
    "transformer.…" / "transformer_2.…" split, each without its expert prefix; {"": state} otherwise."""
    if not isinstance(model, TwoExperts):
        return {"": state}
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name, rest = key.split(".", 1)
        out.setdefault(name, {})[rest] = value
    return out


def lora_file(component: str, default: str) -> str:
    """The LoRA file of a component: `default` (pytorch_lora_weights.safetensors) for the single
    denoiser or `transformer`, `pytorch_lora_weights_transformer_2.safetensors` for the low-noise expert
    (loaded with `load_lora_weights(OUT, weight_name=..., load_into_transformer_2=True)`)."""
    return default if component in ("", "transformer") else default.replace(".safetensors", f"_{component}.safetensors")


LORA_HINT = ("WanPipeline.from_pretrained(BASE).load_lora_weights(OUT) and .load_lora_weights(OUT, weight_name="
             "'pytorch_lora_weights_transformer_2.safetensors', load_into_transformer_2=True)")
