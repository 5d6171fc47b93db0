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
    from mmalign.scoring import parse_spec

    columns = []
    for i, spec in enumerate(o.scorer):
        try:
            columns.append(parse_spec(spec).column)
        except ConfigError as e:
            raise ConfigError(f"online.scorer[{i}]: {e}") from None
    if len(set(columns)) != len(columns):
        raise ConfigError(f"online.scorer: two scorers write the same column ({columns}); rename one with ,as=NAME")
    if o.margin < 0:
        raise ConfigError(f"online.margin must be >= 0, got {o.margin}")
    if o.list_size and not 2 <= o.list_size <= o.group_size:
        raise ConfigError(f"online.list_size must be 0 or in [2, online.group_size={o.group_size}], got {o.list_size}")
    if o.soft_temperature <= 0:
        raise ConfigError(f"online.soft_temperature must be > 0, got {o.soft_temperature}")
    if cfg.data.train:
        raise ConfigError("data.train with online: mixing offline and online data is not supported yet; "
                          "remove data.train (or the online section)")
    if cfg.reference.strategy == "precomputed":
        raise ConfigError("reference.strategy 'precomputed' cannot score records sampled during training: "
                          "use auto, frozen or lora_disabled with online")
