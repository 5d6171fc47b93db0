"""Fully sharded training (`train.fsdp: true`) with torch's FSDP2 (`fully_shard`).

Each process keeps 1/W of every parameter (a `DTensor` shard, dim 0), all-gathers a unit's
parameters just before its forward (and again for backward) and reduce-scatters its gradients:
the summed-over-processes gradient, divided by W, lands on each shard, so an optimizer step
on the shards equals the unsharded step: W processes x batch b == 1 process x batch W·b.

Wrap policy (`shard_units`), one FSDP unit per block, the root holds what is left:
- transformers models (text LMs, VLMs): every module whose class `_no_split_modules` names
  (the decoder layers, and a VLM's vision-tower layers);
- diffusers `UNet2DConditionModel`: each of `down_blocks`, `mid_block`, `up_blocks`;
- diffusers flow transformers (SD3, FLUX, ...): each of `transformer_blocks` and
  `single_transformer_blocks`.
The root unit is not resharded after forward (FSDP2's default for the root), so a head applied
to the captured hidden states after `model(...)` (the chunked LM head) sees full weights.

The frozen reference is sharded with the same policy; the LoRA-disabled reference is the
sharded policy itself with its adapters off. Checkpoints (`train.fsdp_checkpoint`):
- `full` (default): FULL state (every process gathers, the main process writes): the same
  `model.safetensors` as an unsharded run, so every tool reads them unchanged; the optimizer
  state is stored keyed by parameter name (`get_optimizer_state_dict(full_state_dict=True)`) and
  reloaded sharded. The main process holds the whole trainable state and its moments for a moment.
- `sharded`: every process writes its own slices (torch.distributed.checkpoint), no process
  ever holds a full tensor: mmalign/train/sharded_checkpoint.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mmalign.config import Config
from mmalign.errors import ConfigError

__all__ = ["check_sharding", "full_optimizer_state", "full_trainable_state", "gather_in_place", "grad_norm", "is_sharded",
           "load_full_optimizer_state", "load_full_state", "local", "shard_model", "shard_units", "wants_sharding"]


def check_sharding(cfg: Config) -> None:
    """ConfigError for what `train.fsdp` does not support yet (a reference that moves, compile)."""
    if not cfg.train.fsdp:
        return
    online = cfg.online
    if cfg.reference.sync_every or (online is not None and online.reference_update == "every_round"):
        raise ConfigError("train.fsdp: a reference that moves (reference.sync_every, online.reference_update "
                          "every_round) is not implemented yet with sharding")
    if "nft" in ([cfg.loss.name] if isinstance(cfg.loss.name, str) else cfg.loss.name):
        raise ConfigError("train.fsdp: loss nft (its old-policy copy) is not implemented yet with sharding")
    if cfg.train.compile:
        raise ConfigError("train.fsdp: train.compile is not supported with sharding yet (set train.compile: '')")


def wants_sharding(cfg: Config, accelerator: Any) -> bool:
    """Shard with this module's policy: `train.fsdp: true`, or launched with an accelerate FSDP
    config (configs/accelerate/fsdp.yaml), when a process group exists (torchrun / accelerate)."""
    from accelerate.utils import DistributedType

    asked = cfg.train.fsdp or accelerator.distributed_type == DistributedType.FSDP
    return asked and dist.is_initialized()


def _core(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (the one whose blocks are wrapped)."""
    import peft

    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP units, in module order (see the module docstring)."""
    from diffusers import ModelMixin, UNet2DConditionModel
    from transformers import PreTrainedModel

    core = _core(model)
    if isinstance(core, UNet2DConditionModel):
        return [*core.down_blocks, core.mid_block, *core.up_blocks]
    if isinstance(core, ModelMixin):
        units = [block for name in ("transformer_blocks", "single_transformer_blocks")
                 for block in (getattr(core, name, None) or [])]
        if units:
            return units
        raise ConfigError(f"train.fsdp: no wrap policy for {type(core).__name__} (no transformer_blocks)")
    if isinstance(core, PreTrainedModel):
        names = set(core._no_split_modules or [])
        units = [m for m in core.modules() if type(m).__name__ in names]
        if units:
            return units
    raise ConfigError(f"train.fsdp: no wrap policy for {type(core).__name__}")


def unit_class_names(model: nn.Module) -> list[str]:
    """Class names of the units (accelerate's `fsdp_transformer_layer_cls_to_wrap`)."""
    return sorted({type(m).__name__ for m in shard_units(model)})


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`fully_shard` every unit of `shard_units`, then the root, over all processes (in place);
    each process's shards (and the buffers) land on `device` (the full model never does)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    units, names = shard_units(model), unit_class_names(model)  # before fully_shard renames the classes
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if dist.get_rank() == 0:
        print(f"[mmalign] train.fsdp: {type(_core(model)).__name__} sharded over {dist.get_world_size()} processes "
              f"in {len(units)} units ({', '.join(names)}) + the root")
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def grad_norm(parameters: Any) -> torch.Tensor:
    """‖g‖₂ over all gradients, sharded ones included (the shards' squares summed over processes)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and persistent buffers as full CPU tensors (a collective: call
    on every process), keyed as `checkpoint.trainable_state` keys an unsharded model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    persistent = set(model.state_dict().keys())
    keep = trained | {n for n, _ in model.named_buffers() if n in persistent}
    return {k: v.contiguous() for k, v in full.items() if k in keep}


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (some of the model's keys) into the sharded model, each process its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state, full tensors keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


@torch.no_grad()
def gather_in_place(model: nn.Module) -> None:
    """Replace every sharded parameter by its full tensor (a collective), tied weights kept tied:
    the model can then `save_pretrained` like an unsharded one (done once, at the end of a run)."""
    from torch.distributed.tensor import DTensor

    full: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in full:
                    full[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                module._parameters[name] = full[id(p)]
