"""Sharded checkpoints (`train.fsdp_checkpoint: sharded`): every process writes its own shards.

A sharded checkpoint is the folder of a full one (mmalign/train/checkpoint.py) with, in place
of `model.safetensors`,
- `model_shards/shard-0000R-model-00001-of-00001.safetensors`: process R-1's slices of the
  trainable parameters and persistent buffers (the keys of `checkpoint.trainable_state`),
- `optimizer_shards/shard-0000R-...safetensors`: its slices of the optimizer's tensors, keyed
  `<parameter name>.<state key>` (AdamW: `exp_avg`, `exp_avg_sq` sliced like the parameter;
  the scalar `step`, the same on every process, is written once),
- `trainer.pt`: as in a full checkpoint, its "optimizer" entry being the optimizer state minus
  those tensors (`param_groups`, non-tensor state), written by the main process.
FSDP2 shards a parameter of n rows along dim 0: process p of W keeps rows
[p·⌈n/W⌉, min((p+1)·⌈n/W⌉, n)) (an empty slice past the end), so no file holds a whole sharded
tensor; the full tensor is the slices put back at their offsets.

Written with torch.distributed.checkpoint (DCP) in its safetensors layout
(`HuggingFaceStorageWriter(save_distributed=True)`): each file's header records the offset of
every slice it holds in the full tensor, so reading needs no pickle at all (safetensors for the
tensors, `trainer.pt` with weights_only=True). Atomic as a full checkpoint: every process writes
into the hidden `.step_N.tmp`; `dcp.save` ends with a collective gathering every process's write
results (its files written and fsynced), and only after it returns does the main process write
`trainer.pt` and `state.json`, rename the folder into place and replace `latest`. A process
killed mid-save leaves the hidden folder (removed by the next run) and `latest` on the previous
checkpoint. Every process writes into the same folder: `train.output_dir` must be on a filesystem
all processes see (one machine, or a shared one across machines).

Reading reshards: DCP reads the slices each process needs, for any number of processes; one
process (an unsharded resume, `mmalign export`) reads full tensors (`consolidate`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmalign.errors import CheckpointError
from mmalign.train import checkpoint as ckpt
from mmalign.train.checkpoint import trainable_tensors

__all__ = ["MODEL_DIR", "OPTIMIZER_DIR", "consolidate", "is_sharded_checkpoint", "load_sharded", "save_sharded"]

MODEL_DIR, OPTIMIZER_DIR = "model_shards", "optimizer_shards"


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint folder written by `save_sharded`."""
    return (Path(path) / MODEL_DIR).is_dir()


def _raw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (whose parameters are the model's)."""
    from accelerate.optimizer import AcceleratedOptimizer

    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def _split(optim_state: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensors, rest) of `get_optimizer_state_dict`'s {"state": {name: {key: value}},
    "param_groups": [...]}: the per-parameter tensors, and everything else (written to trainer.pt)."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, dict[str, Any]] = {}
    for name, entry in optim_state["state"].items():
        for key, value in entry.items():
            (tensors if isinstance(value, torch.Tensor) else other).setdefault(name, {})[key] = value
    return tensors, {"state": other, "param_groups": optim_state["param_groups"]}


def _write(state: dict[str, Any], folder: Path) -> None:
    """Every process writes its slices of `state` into `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
             no_dist=not dist.is_initialized())


def _read(template: dict[str, Any], folder: Path, no_dist: bool = False) -> None:
    """Fill `template`'s tensors (full or DTensor shards) in place from the slices in `folder`
    (a collective unless `no_dist` or there is no process group); a missing key or a damaged
    file is a CheckpointError naming the folder (on every process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException

    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing (an incomplete sharded checkpoint)")
    no_dist = no_dist or not dist.is_initialized()
    try:
        with warnings.catch_warnings():  # DCP warns that one process reads alone, which is meant here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(template, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # DCP gathers every process's failure, raises it on all
        raise CheckpointError(f"{folder} is unreadable or damaged ({type(e).__name__}: {str(e)[:300]})") from e


def consolidate(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full tensors of a shard folder (one process, no process group): the slices of every
    key placed at their offsets; keys as written (`model_shards`: the parameter names)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = Path(folder)
    try:
        meta = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"{folder} is unreadable or damaged ({type(e).__name__}: {e})") from e
    full = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    _read(full, folder, no_dist=True)
    return full


def save_sharded(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 trainer_state: dict[str, Any], info: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint `step` with every process's shards (call on every process: collectives),
    atomically, and prune older ones (keeping `keep_last`); `trainer_state` (scheduler, loss
    state, ...) is written by the main process, with the optimizer's non-tensor part added."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    main = not dist.is_initialized() or dist.get_rank() == 0
    root = Path(output_dir) / "checkpoints"
    tmp, final = (ckpt.checkpoint_folders(output_dir, step) if main
                  else (root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"))
    if dist.is_initialized():
        dist.barrier()  # the fresh temporary folder exists for every process
    tensors, rest = _split(get_optimizer_state_dict(model, _raw(optimizer), options=StateDictOptions()))
    try:
        _write(trainable_tensors(model), tmp / MODEL_DIR)
        _write(tensors, tmp / OPTIMIZER_DIR)  # returns once every process's files are written
    except (Exception, CheckpointException) as e:  # on every process (DCP gathers the failures)
        ckpt.raise_disk_full(e, tmp / MODEL_DIR, tmp)
    if main:
        ckpt.write_trainer_files(tmp, dict(trainer_state, optimizer=rest), dict(info, step=step))
        ckpt.publish(tmp, final, keep_last)
    if dist.is_initialized():
        dist.barrier()  # no process goes on before `latest` names the new checkpoint
    return final


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rest: dict[str, Any]) -> None:
    """Load checkpoint `path`'s shards into `model` and `optimizer` (each process the slices of
    its own shards; full tensors for an unsharded model), `rest` being the optimizer's
    non-tensor part from trainer.pt. Both shard folders are read into copies first, so a damaged
    file (CheckpointError, on every process) leaves the weights as they were and loads no
    optimizer state (a fresh optimizer gets zero moments, as `get_optimizer_state_dict` makes them)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    live = trainable_tensors(model)
    weights = {k: torch.empty_like(v) for k, v in live.items()}
    _read(weights, path / MODEL_DIR)
    raw = _raw(optimizer)
    template, _ = _split(get_optimizer_state_dict(model, raw, options=StateDictOptions()))
    moments = {name: {key: torch.empty_like(v) for key, v in entry.items()} for name, entry in template.items()}
    _read(moments, path / OPTIMIZER_DIR)
    with torch.no_grad():
        for k, v in live.items():
            v.copy_(weights[k])
    state = {name: {**moments.get(name, {}), **rest["state"].get(name, {})}
             for name in {*moments, *rest["state"]}}
    set_optimizer_state_dict(model, raw, {"state": state, "param_groups": rest["param_groups"]},
                             options=StateDictOptions())
