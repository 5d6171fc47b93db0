"""Load-time checks of the `online:` config section (called by `mmalign.config.validate`): one
ConfigError line per bad value, naming its key."""

from __future__ import annotations

from typing import Any

from mmalign.errors import ConfigError


def validate_online(cfg: Any) -> None:
    """One-line ConfigErrors for `online:` values no single field can check."""
    o = cfg.online
    for name in ("prompts_per_round", "round_steps", "sample_batch_size"):
        if getattr(o, name) < 1:
            raise ConfigError(f"online.{name} must be >= 1, got {getattr(o, name)}")
    if o.group_size < 2:
        raise ConfigError(f"online.group_size must be >= 2 (a group is ranked against itself), got {o.group_size}")
    if not o.prompts and not o.prompt_list:
        raise ConfigError("online.prompts (a prompt file) or online.prompt_list is required")
    if not o.scorer:
        raise ConfigError("online.scorer is empty: give at least one `mmalign score` spec NAME=PATH[,key=value...]")
    _check_specs("online.scorer", o.scorer)
    if o.margin < 0:
        raise ConfigError(f"online.margin must be >= 0, got {o.margin}")
    if o.list_size and not 2 <= o.list_size <= o.group_size:
        raise ConfigError(f"online.list_size must be 0 or in [2, online.group_size={o.group_size}], got {o.list_size}")
    if o.soft_temperature <= 0:
        raise ConfigError(f"online.soft_temperature must be > 0, got {o.soft_temperature}")
    _check_mixing(cfg)
    _check_guards(cfg)
    if cfg.reference.strategy == "precomputed":
        raise ConfigError("reference.strategy 'precomputed' cannot score records sampled during training: "
                          "use auto, frozen or lora_disabled with online")


def _check_specs(key: str, specs: list[str]) -> None:
    """Each spec parses (`mmalign score` syntax) and no two write the same column."""
    from mmalign.scoring import parse_spec

    columns = []
    for i, spec in enumerate(specs):
        try:
            columns.append(parse_spec(spec).column)
        except ConfigError as e:
            raise ConfigError(f"{key}[{i}]: {e}") from None
    if len(set(columns)) != len(columns):
        raise ConfigError(f"{key}: two scorers write the same column ({columns}); rename one with ,as=NAME")


def _check_mixing(cfg: Any) -> None:
    """data.train with online: only through online.offline_per_round (the rule of `online.mixing`)."""
    o = cfg.online
    if o.offline_per_round < 0:
        raise ConfigError(f"online.offline_per_round must be >= 0, got {o.offline_per_round}")
    if cfg.data.train and not o.offline_per_round:
        raise ConfigError("data.train with online: set online.offline_per_round (offline records added to each "
                          "round) or remove data.train")
    if o.offline_per_round and not cfg.data.train:
        raise ConfigError(f"online.offline_per_round={o.offline_per_round} needs data.train (the offline records)")


def _check_guards(cfg: Any) -> None:
    """The held-out evaluation (eval_scorer + eval prompts) and the reference refresh."""
    o = cfg.online
    _check_specs("online.eval_scorer", o.eval_scorer)
    has_prompts = bool(o.eval_prompts or o.eval_prompt_list)
    if o.eval_scorer and not has_prompts:
        raise ConfigError("online.eval_scorer needs held-out prompts: online.eval_prompts or online.eval_prompt_list")
    if has_prompts and not o.eval_scorer:
        raise ConfigError("online.eval_prompts/eval_prompt_list need online.eval_scorer (the evaluation scorer)")
    if o.eval_samples < 1:
        raise ConfigError(f"online.eval_samples must be >= 1, got {o.eval_samples}")
    if o.reference_update == "every_round" and (cfg.lora.enabled or cfg.reference.strategy == "lora_disabled"):
        raise ConfigError("online.reference_update every_round needs full fine-tuning with a frozen reference: with "
                          "LoRA the reference is the base weights, and merging the adapter into it would not give "
                          "the policy's log-probs exactly; set lora.enabled=false or reference_update=none")
