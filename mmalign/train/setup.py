"""Building blocks the trainer assembles: the contract check of its parts, accelerator, LoRA,
reference strategy, and the precomputed-reference cache."""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from mmalign.config import Config, TrainConfig
from mmalign.errors import ConfigError
from mmalign.io import atomic_path
from mmalign.layout import batch_slots, by_record
from mmalign.losses import LossSpec
from mmalign.nn import eval_mode
from mmalign.types import DataSource, Likelihood, TokenSquareMass, TokenValues


def check_contracts(cfg: Config, likelihood: Likelihood, source: DataSource | None) -> None:
    """Refuse parts that do not satisfy the protocols of `mmalign.types` (TypeError), or that lack
    an ability the config asks for (ConfigError)."""
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"{type(likelihood).__name__} is not a mmalign.types.Likelihood: it needs "
                        "`deterministic`, `to(device)`, `collate(records, kind)`, `draw(batch, generator)` "
                        "and `logps(model, batch, draw)`")
    if source is not None and not isinstance(source, DataSource):
        raise TypeError(f"{type(source).__name__} is not a mmalign.types.DataSource: it needs `kind`, `describe()` "
                        "and `records_for_step(step, model, accelerator)`")
    if source is not None and cfg.data.group_by_length:
        raise ConfigError("data.group_by_length is for offline data: online rounds pick their own rows; set it to 0")
    if cfg.loss.dense_gamma and not isinstance(likelihood, TokenValues):
        raise ConfigError(f"loss.dense_gamma needs per-token log-probs, which {type(likelihood).__name__} does not "
                          "give: use a token likelihood (causal_lm, llava)")
    if cfg.loss.ld_alpha is not None and not isinstance(likelihood, TokenValues):
        raise ConfigError(f"loss.ld_alpha (LD-DPO) needs per-token log-probs, which {type(likelihood).__name__} "
                          "does not give: use a token likelihood (causal_lm, llava)")
    if cfg.loss.use_weighting and not isinstance(likelihood, TokenSquareMass):
        raise ConfigError(f"loss.use_weighting (WPO) needs per-token probabilities, which {type(likelihood).__name__} "
                          "does not give: use a token likelihood (causal_lm, llava)")


def make_accelerator(t: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # One Accelerator per run: a second run in the same process (tests, the demo) may ask
    # for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # On a machine without CUDA, cpu=True lets torchrun start several gloo processes.
    cpu = t.cpu or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=t.mixed_precision)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward: transformers 5 (`activation_checkpointing_enable`),
    transformers 4 (`gradient_checkpointing_enable`) or diffusers (`enable_gradient_checkpointing`)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    else:
        raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} cannot checkpoint activations")


def apply_lora(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Wrap with peft LoRA adapters (base frozen) and enable gradient checkpointing if asked."""
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    if not cfg.lora.enabled:
        return model
    import peft

    lora = cfg.lora
    peft_config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=list(lora.target_modules))
    if cfg.model.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings must still pass gradients into checkpoints
    # LoRA's A matrices are random: seed them so a config always gives the same run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return peft.get_peft_model(model, peft_config)


def resolve_strategy(cfg: Config, spec: LossSpec, likelihood: Likelihood) -> str:
    """The reference strategy to use: `reference.strategy`, with "auto" resolved and the ones the
    loss or likelihood cannot use refused."""
    strategy = cfg.reference.strategy
    if not spec.needs_reference:
        return "none"
    if strategy == "auto":
        return "lora_disabled" if cfg.lora.enabled else "frozen"
    if strategy == "none":
        raise ConfigError(f"loss '{cfg.loss.name}' needs a reference; reference.strategy 'none' is for simpo")
    if strategy == "precomputed" and not likelihood.deterministic:
        raise ConfigError("reference.strategy 'precomputed' needs a deterministic likelihood "
                          "(diffusion draws differ every step)")
    return strategy


def _fingerprint(cfg: Config, num_records: int) -> str:
    facts = {"data": cfg.data.train, "n": num_records, "model": cfg.model.path, "dtype": cfg.model.dtype,
             "max_length": cfg.data.max_length, "chat": cfg.data.chat_template, "modality": cfg.modality}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def _score_records(trainer: Any, model: torch.nn.Module, records: list[dict[str, Any]]) -> list[list[float]]:
    out: list[list[float]] = []
    size = trainer.cfg.train.eval_batch_size
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with disable, eval_mode(model), trainer.accelerator.autocast():
        for start in range(0, len(records), size):
            chunk = records[start : start + size]
            batch = trainer.likelihood.collate(chunk, trainer.kind).to(trainer.accelerator.device)
            logps = trainer.likelihood.logps(model, batch, trainer.likelihood.draw(batch, None)).logps.float().cpu()
            out += by_record(logps.tolist(), batch_slots(chunk, trainer.kind), len(chunk))
    return out


def precompute_reference(trainer: Any, model: torch.nn.Module) -> dict[str, list[list[float]] | None]:
    """Score every train (and eval) record once with the initial model (adapters off).
    Returns {split: per-record list of item log-likelihoods}; cached in output_dir, keyed
    by a fingerprint of data, model and tokenisation."""
    from accelerate.utils import gather_object
    from safetensors.torch import load_file, save_file

    acc, cfg = trainer.accelerator, trainer.cfg
    model = model.to(acc.device)
    tables: dict[str, list[list[float]] | None] = {"train": None, "eval": None}
    for name, records in (("train", trainer.records), ("eval", trainer.eval_records)):
        if not records:
            continue
        path = Path(cfg.train.output_dir) / f"reference_logps_{name}.safetensors"
        key = _fingerprint(cfg, len(records)) + name
        values = None
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") == key:
                    values = load_file(str(path))["logps"].tolist()
        if values is None:
            mine = list(range(acc.process_index, len(records), acc.num_processes))
            scored = _score_records(trainer, model, trainer.fetch(name, mine))
            pairs = gather_object(list(zip(mine, scored))) if acc.num_processes > 1 else list(zip(mine, scored))
            values = [v for _, v in sorted(pairs)]
            if acc.is_main_process:
                with atomic_path(path) as tmp:
                    save_file({"logps": torch.tensor(values)}, str(tmp), metadata={"fingerprint": key})
        tables[name] = values
    acc.wait_for_everyone()
    return tables
