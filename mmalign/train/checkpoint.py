"""Atomic, resumable checkpoints.

A checkpoint is a folder `output_dir/checkpoints/step_XXXXXXXX/` with
- `model.safetensors`: the trainable parameters (LoRA adapters only, with LoRA) and buffers,
- `reference.safetensors`: the reference weights, only when they change (TR-DPO sync),
- `trainer.pt`: optimizer, scheduler, grad-scaler and loss state (loaded with weights_only=True),
- `state.json`: step and run facts for humans.
A sharded run with `train.fsdp_checkpoint: sharded` writes every process's shards in place of
`model.safetensors` (and of the optimizer tensors in `trainer.pt`): mmalign/train/sharded_checkpoint.py.
It is written to a hidden temporary folder, fsynced and renamed into place, then the `latest`
file is replaced atomically (also fsynced), so a crash or a power loss mid-write never damages
the last good one. Resume reads the newest checkpoint that loads; a damaged one (e.g. emptied by
a full disk) is named and skipped in favour of the previous one (`load_latest`).
The data position and every random draw are pure functions of (seed, step), so the step
is all a resumed run needs to read the same examples with the same randomness.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from mmalign.errors import CheckpointError
from mmalign.io import atomic_path, clean_stale_tmp, disk_full_error, fsync_dir, fsync_path


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers (tied weights appear once), detached, as the
    model holds them (on its device; DTensor shards when sharded)."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    persistent = set(model.state_dict().keys())
    state.update({n: b.detach() for n, b in model.named_buffers() if n in persistent})
    return state


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers (tied weights appear once), on the CPU."""
    return {k: v.contiguous().cpu() for k, v in trainable_tensors(model).items()}


def load_trainable_state(model: torch.nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load the trainable state saved in `path` (or already read from it: `state`) into `model`."""
    from mmalign.train.sharding import is_sharded, load_full_state

    state = load_file(str(path)) if state is None else state
    if is_sharded(model):  # each process keeps its shard of the full tensors
        load_full_state(model, state)
        return
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{path}: unexpected keys {result.unexpected_keys[:5]}")
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = expected - set(state)
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks trainable parameters {sorted(missing)[:5]}")


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the trainable state of checkpoint folder `path` into a whole (unsharded) model, in
    one process: its `model.safetensors`, or a sharded checkpoint's shards put back together."""
    from mmalign.train.sharded_checkpoint import MODEL_DIR, consolidate, is_sharded_checkpoint

    if is_sharded_checkpoint(path):
        load_trainable_state(model, path / MODEL_DIR, consolidate(path / MODEL_DIR))
    else:
        load_trainable_state(model, path / "model.safetensors")


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_files(tmp: Path, model: torch.nn.Module, trainer_state: dict[str, Any], info: dict[str, Any],
                 reference: torch.nn.Module | None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The files of a checkpoint into `tmp`, fsynced; a full disk is an `OSError(ENOSPC)` naming
    the file being written (the previous checkpoint stays the latest)."""
    target = tmp / "model.safetensors"
    try:
        save_file(trainable_state(model) if weights is None else weights, str(target))
        if reference is not None:
            target = tmp / "reference.safetensors"
            save_model(reference, str(target))  # handles tied (shared) weights
    except Exception as e:
        raise_disk_full(e, target, tmp)
    write_trainer_files(tmp, trainer_state, info)


def raise_disk_full(error: BaseException, target: Path, tmp: Path) -> NoReturn:
    """Re-raise `error` (raised writing `target`), as an OSError(ENOSPC) naming `target` when the
    disk is full (then the partial checkpoint `tmp` is removed to free its space)."""
    full = disk_full_error(error, target)
    if full is None:
        raise error
    shutil.rmtree(tmp, ignore_errors=True)
    raise full from error


def write_trainer_files(tmp: Path, trainer_state: dict[str, Any], info: dict[str, Any]) -> None:
    """`trainer.pt` and `state.json` into `tmp`, then every file under `tmp` fsynced (its bytes on
    disk before the rename makes the folder visible)."""
    target = tmp / "trainer.pt"
    try:
        torch.save(trainer_state, target)
        target = tmp / "state.json"
        target.write_text(json.dumps(info, indent=2, default=str))
        fsync_path(tmp)
    except Exception as e:
        raise_disk_full(e, target, tmp)


def checkpoint_folders(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    """(hidden temporary folder, final folder) of checkpoint `step`; the temporary one fresh."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, root / f"step_{step:08d}"


def publish(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename the complete `tmp` into place as `final`, then point `latest` at it (both durable)
    and prune older checkpoints, keeping `keep_last` (all when 0)."""
    root = final.parent
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    _atomic_write_text(root / "latest", final.name)
    for old in sorted(root.glob("step_*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    info: dict[str, Any], reference: torch.nn.Module | None = None, keep_last: int = 2,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically and prune older ones (keeping `keep_last`); `weights`:
    the trainable state already gathered (a sharded model), else read from `model`."""
    tmp, final = checkpoint_folders(output_dir, step)
    _write_files(tmp, model, trainer_state, dict(info, step=step), reference, weights)
    return publish(tmp, final, keep_last)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "trainer.pt").is_file() else None


def checkpoint_candidates(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders to resume from, best first: the one `latest` names, then the others
    from the newest step down."""
    root = Path(output_dir) / "checkpoints"
    folders = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    return ([named] if named in folders else []) + [p for p in folders if p != named]


def read_info(path: Path) -> dict[str, Any]:
    """The run facts of checkpoint `path` (`state.json`: step, config, ...)."""
    file = path / "state.json"
    try:
        info = json.loads(file.read_text())
        int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file} is unreadable or damaged ({type(e).__name__}: {e})") from e
    return info


def _read(file: Path, reader: Callable[[Path], Any]) -> Any:
    """`reader(file)`, with a damaged or missing file as a CheckpointError naming it."""
    try:
        return reader(file)
    except Exception as e:  # safetensors, unpickling and OS errors of a truncated or emptied file
        raise CheckpointError(f"{file} is unreadable or damaged ({type(e).__name__}: {e})") from e


def load_checkpoint(path: Path, model: torch.nn.Module, reference: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[int, dict[str, Any]]:
    """Load model (and reference) weights in place; return (step, trainer_state). Every file is
    read before anything is loaded, so a damaged one (a CheckpointError naming it) leaves the
    models untouched. A sharded checkpoint (mmalign/train/sharded_checkpoint.py) also loads the
    `optimizer` (each process its slices; a collective)."""
    from mmalign.train.sharded_checkpoint import is_sharded_checkpoint, load_sharded

    step = int(read_info(path)["step"])
    if is_sharded_checkpoint(path):
        if optimizer is None:
            raise ValueError(f"{path} is a sharded checkpoint: loading it needs the optimizer")
        trainer_state = _read(path / "trainer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
        load_sharded(path, model, optimizer, trainer_state["optimizer"])
        return step, trainer_state
    weights = _read(path / "model.safetensors", lambda f: load_file(str(f)))
    ref_file = path / "reference.safetensors"
    ref_weights = _read(ref_file, lambda f: load_file(str(f))) if reference is not None and ref_file.is_file() else None
    trainer_state = _read(path / "trainer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    load_trainable_state(model, path / "model.safetensors", weights)
    if ref_weights is not None:
        load_model(reference, str(ref_file))  # tied weights: safetensors' own loader (file read above)
    return step, trainer_state


def load_latest(output_dir: str | Path, model: torch.nn.Module, reference: torch.nn.Module | None = None,
                check: Callable[[Path, dict[str, Any]], None] | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> tuple[Path, int, dict[str, Any]] | None:
    """Load the newest checkpoint that is intact; a damaged one is reported (naming the file) and
    the previous one tried. `check(path, info)` may refuse a checkpoint by raising (not caught).
    None when there is no checkpoint; CheckpointError when none of them loads. `optimizer`: loaded
    from a sharded checkpoint (a full one keeps its state in the returned trainer state)."""
    candidates = checkpoint_candidates(output_dir)
    if not candidates:
        return None
    problems = []
    for path in candidates:
        try:
            info = read_info(path)
            if check is not None:
                check(path, info)
            step, state = load_checkpoint(path, model, reference, optimizer)
        except CheckpointError as e:
            problems.append(str(e))
            print(f"[mmalign] warning: {e}; trying the previous checkpoint")
            continue
        return path, step, state
    raise CheckpointError(f"no intact checkpoint in {Path(output_dir) / 'checkpoints'}: {'; '.join(problems)}")


def clean_stale_writes(output_dir: str | Path) -> None:
    """Remove what killed writers left in `output_dir`: `.NAME.tmp-PID` files of dead processes
    and the hidden temporary checkpoint and final folders (call before this run writes any)."""
    out = Path(output_dir)
    removed = clean_stale_tmp(out) + clean_stale_tmp(out / "checkpoints")
    for tmp in [*(out / "checkpoints").glob(".step_*.tmp"), out / ".final.tmp"]:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        print(f"[mmalign] removed {len(removed)} unfinished write(s) of a killed run: "
              f"{', '.join(p.name for p in removed)}")


def save_pretrained_atomic(model: torch.nn.Module, processor: Any, path: Path) -> None:
    """`save_pretrained` into a temporary folder, then rename into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(str(tmp))
    fsync_path(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_dir(path.parent)
