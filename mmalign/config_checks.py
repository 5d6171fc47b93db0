"""Load-time checks of a run config (`mmalign.config.validate`): every value no single field's type
can check, each failure one ConfigError line naming the key and its valid range or the nearest
valid name."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import TYPE_CHECKING

from mmalign.config import Config, DiffusionConfig, LossConfig
from mmalign.errors import ConfigError

if TYPE_CHECKING:
    from mmalign.losses import LossSpec


def validate_config(cfg: Config) -> None:
    """Cross-field checks that a single field cannot express."""
    _validate_names(cfg)
    _validate_ranges(cfg)
    from mmalign.data.media_checks import check_verify_choice

    check_verify_choice(cfg.data.verify_media)
    if cfg.data.streaming < 0:
        raise ConfigError(f"data.streaming must be >= 0 (rows kept from a streamed Hub split; 0 = the whole split), "
                          f"got {cfg.data.streaming}")
    if cfg.data.group_by_length < 0 or (cfg.data.group_by_length and cfg.online is not None):
        raise ConfigError(f"data.group_by_length must be >= 0 (0 = off) and is for offline data (online rounds "
                          f"pick their own rows), got {cfg.data.group_by_length}")
    t = cfg.train
    for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.report_to:
        from mmalign.train.trackers import check_report_to

        check_report_to(t.report_to)
    if cfg.loss.dense_gamma < 0:
        raise ConfigError(f"loss.dense_gamma must be >= 0 (0 = off), got {cfg.loss.dense_gamma}")
    if cfg.loss.dense_gamma and cfg.reference.strategy == "precomputed":
        raise ConfigError("loss.dense_gamma needs per-token reference log-probs; a precomputed reference "
                          "keeps sums only: use reference.strategy frozen or lora_disabled")
    if cfg.loss.ld_alpha is not None and cfg.reference.strategy == "precomputed":
        raise ConfigError("loss.ld_alpha (LD-DPO) needs per-token reference log-probs; a precomputed reference "
                          "keeps sums only: use reference.strategy frozen or lora_disabled")
    if cfg.loss.beta <= 0:
        raise ConfigError(f"loss.beta must be > 0, got {cfg.loss.beta}")
    _validate_image_term(cfg)
    if cfg.reference.strategy == "lora_disabled" and not cfg.lora.enabled:
        raise ConfigError("reference.strategy 'lora_disabled' needs lora.enabled: true")
    if cfg.reference.sync_every and cfg.reference.strategy not in ("frozen", "auto"):
        raise ConfigError("reference.sync_every (TR-DPO) needs a frozen reference copy")
    if cfg.reference.sync_every and cfg.lora.enabled:
        raise ConfigError("reference.sync_every (TR-DPO) is for full fine-tuning, not LoRA")
    if not 0.0 < cfg.reference.sync_alpha <= 1.0:
        raise ConfigError(f"reference.sync_alpha must be in (0, 1], got {cfg.reference.sync_alpha}")
    _validate_diffusion(cfg.diffusion)
    if cfg.online is not None:
        from mmalign.online.checks import validate_online

        validate_online(cfg)
    from mmalign.train.nft import validate_nft

    validate_nft(cfg)


# LossConfig fields that a loss function takes but that the trainer also reads for every loss:
# beta scales the logged implicit rewards and the VLM image terms (even with `loss.name: sft`).
SHARED_LOSS_KEYS = frozenset({"beta"})


def _known(where: str, value: str, valid: list[str], what: str) -> None:
    """A ConfigError naming the nearest of `valid` unless `value` is one of them."""
    if value in valid:
        return
    match = difflib.get_close_matches(value, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{match[0]}'?" if match else f"valid: {', '.join(valid)}"
    raise ConfigError(f"{where}: unknown {what} '{value}'; {hint}")


def _validate_names(cfg: Config) -> None:
    """`modality` and `loss.name` are registered; no other loss's hyperparameter is set."""
    from mmalign.losses import LOSSES
    from mmalign.modalities import known_modalities

    _known("modality", cfg.modality, known_modalities(), "modality")
    from mmalign.losses_combined import combined_spec, loss_names

    names = loss_names(cfg.loss.name)
    if not names:
        raise ConfigError("loss.name: an empty list; name at least one loss")
    for name in names:
        _known("loss.name", name, sorted(LOSSES), "loss")
    if len(set(names)) < len(names):
        raise ConfigError(f"loss.name lists a loss twice: {names}; weight it once with loss.weights")
    if cfg.loss.weights is not None and len(cfg.loss.weights) != len(names):
        raise ConfigError(f"loss.weights needs one weight per loss of loss.name: {len(cfg.loss.weights)} weights "
                          f"for {len(names)} losses ({', '.join(names)})")
    if len(names) > 1:
        try:
            combined_spec(names, cfg.loss.weights)
        except ValueError as e:
            raise ConfigError(f"loss.name: {e}") from None
    _validate_loss_hyperparameters(cfg.loss, LOSSES)
    from mmalign.losses_more import check_scope

    if (why := check_scope(names, cfg.modality)) is not None:
        raise ConfigError(f"loss.name: {why}")
    _validate_loss_options(cfg.loss, LOSSES)


def _validate_loss_options(loss: LossConfig, losses: dict[str, LossSpec]) -> None:
    """The f-divergence only for losses built on delta alone (as TRL); exo_pair needs eps > 0."""
    from mmalign.losses import F_DIVERGENCES

    from mmalign.losses_combined import loss_names

    names = loss_names(loss.name)
    specs = [losses[n] for n in names]
    _known("loss.f_divergence_type", loss.f_divergence_type, list(F_DIVERGENCES), "f-divergence")
    refusing = [n for n, s in zip(names, specs) if not s.f_divergence]
    if loss.f_divergence_type != "reverse_kl" and refusing:
        takes = sorted(n for n, s in losses.items() if s.f_divergence)
        raise ConfigError(f"loss.f_divergence_type={loss.f_divergence_type} applies only to the losses built on "
                          f"the reward difference delta ({', '.join(takes)}), not to loss '{refusing[0]}': use the "
                          "default reverse_kl")
    if loss.f_alpha_divergence_coef != LossConfig.f_alpha_divergence_coef and loss.f_divergence_type != "alpha_divergence":
        raise ConfigError(f"loss.f_alpha_divergence_coef={loss.f_alpha_divergence_coef} has no effect unless "
                          "loss.f_divergence_type is alpha_divergence")
    if "exo_pair" in names and not 0 < loss.label_smoothing < 1:
        raise ConfigError(f"loss 'exo_pair' needs 0 < loss.label_smoothing < 1 (EXO uses 1e-3), "
                          f"got {loss.label_smoothing}")
    if loss.ld_alpha is not None:
        if not 0 <= loss.ld_alpha <= 1:
            raise ConfigError(f"loss.ld_alpha must be in [0, 1] (None = off), got {loss.ld_alpha}")
        if specs[0].kind != "pair":
            raise ConfigError(f"loss.ld_alpha (LD-DPO) re-weights chosen/rejected pairs; loss '{names[0]}' "
                              f"takes '{specs[0].kind}' data")
        if loss.dense_gamma:
            raise ConfigError("loss.ld_alpha and loss.dense_gamma both re-weight answer tokens: choose one")
    for name, spec in zip(names, specs):
        if loss.use_weighting and (spec.kind != "pair" or spec.batch_level):
            why = "sorts its batch, which would misalign the pair weights" if spec.batch_level else f"takes '{spec.kind}' data"
            raise ConfigError(f"loss.use_weighting (WPO) weights chosen/rejected pairs; loss '{name}' {why}")
    if not 0 < loss.cpl_lambda <= 1:
        raise ConfigError(f"loss.cpl_lambda must be in (0, 1] (1 = no conservative bias), got {loss.cpl_lambda}")
    if loss.discopop_tau <= 0:
        raise ConfigError(f"loss.discopop_tau must be > 0, got {loss.discopop_tau}")


def _validate_loss_hyperparameters(loss: LossConfig, losses: dict[str, LossSpec]) -> None:
    """A LossConfig field that is a hyperparameter of some registered loss but not of the
    chosen one (nor in SHARED_LOSS_KEYS) must keep its default: it would have no effect."""
    from mmalign.losses_combined import loss_names

    names = loss_names(loss.name)
    takes = tuple(dict.fromkeys(h for n in names for h in losses[n].hyperparameters))
    defaults = LossConfig()
    for f in dataclasses.fields(LossConfig):
        owners = [name for name, spec in sorted(losses.items()) if f.name in spec.hyperparameters]
        value = getattr(loss, f.name)
        if not owners or f.name in takes or f.name in SHARED_LOSS_KEYS or value == getattr(defaults, f.name):
            continue
        taken = f"which takes: {', '.join(takes)}" if takes else "which takes no hyperparameters"
        raise ConfigError(f"loss.{f.name}={value} is a hyperparameter of {', '.join(owners)}, "
                          f"not of loss '{'+'.join(names)}', {taken}")


def _validate_ranges(cfg: Config) -> None:
    """Numbers that would crash or poison a run later (a division by zero at the first log, a
    NaN from the first optimizer step): each a one-line error naming the key and its range.
    The documented 0 = off settings (save_every, eval_every, validate_every, ...) stay allowed."""
    t, o = cfg.train, cfg.optim
    checks = [
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.save_every", t.save_every, t.save_every >= 0, ">= 0 (0 = only at the end)"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0 = only at the start and the end)"),
        ("train.validate_every", t.validate_every, t.validate_every >= 0, ">= 0 (0 = off)"),
        ("train.keep_last", t.keep_last, t.keep_last >= 0, ">= 0 (0 = keep all)"),
        ("train.skip_nonfinite_steps", t.skip_nonfinite_steps, t.skip_nonfinite_steps >= 0, ">= 0 (0 = none)"),
        ("optim.lr", o.lr, math.isfinite(o.lr) and o.lr > 0, "finite and > 0"),
        ("optim.eps", o.eps, math.isfinite(o.eps) and o.eps > 0, "finite and > 0"),
        ("optim.weight_decay", o.weight_decay, math.isfinite(o.weight_decay) and o.weight_decay >= 0, ">= 0"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
        ("optim.max_grad_norm", o.max_grad_norm, math.isfinite(o.max_grad_norm) and o.max_grad_norm >= 0,
         "finite and >= 0 (0 = no clipping)"),
        ("optim.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two values in [0, 1)"),
        ("lora.r", cfg.lora.r, cfg.lora.r >= 1, ">= 1"),
        ("model.lm_head_chunk", cfg.model.lm_head_chunk, cfg.model.lm_head_chunk >= 0, ">= 0 (0 = full logits)"),
        ("loss.beta", cfg.loss.beta, math.isfinite(cfg.loss.beta), "finite and > 0"),
    ]
    for key, value, ok, valid in checks:
        if not ok:
            raise ConfigError(f"{key} must be {valid}, got {value}")


def _validate_image_term(cfg: Config) -> None:
    loss = cfg.loss
    if loss.image_term == "none":
        return
    if cfg.reference.strategy == "precomputed":
        raise ConfigError(f"loss.image_term '{loss.image_term}' scores a freshly modified image every step, which "
                          "a precomputed reference cannot: use reference.strategy frozen or lora_disabled")
    if loss.image_term_weight < 0:
        raise ConfigError(f"loss.image_term_weight must be >= 0, got {loss.image_term_weight}")
    low, high = (loss.corruption_crop_scale + [0.0, 0.0])[:2]
    if len(loss.corruption_crop_scale) != 2 or not 0 < low <= high <= 1:
        raise ConfigError(f"loss.corruption_crop_scale must be [low, high] with 0 < low <= high <= 1, "
                          f"got {loss.corruption_crop_scale}")
    if not 0 <= loss.corruption_noise_step < 1000:
        raise ConfigError(f"loss.corruption_noise_step must be in [0, 999], got {loss.corruption_noise_step}")
    if not 0 <= loss.corruption_mask_ratio <= 1:
        raise ConfigError(f"loss.corruption_mask_ratio must be in [0, 1], got {loss.corruption_mask_ratio}")
    if loss.corruption_mask_patch < 1:
        raise ConfigError(f"loss.corruption_mask_patch must be >= 1, got {loss.corruption_mask_patch}")


def _validate_diffusion(d: DiffusionConfig) -> None:
    if d.resolution < 8 or d.resolution % 8:
        raise ConfigError(f"diffusion.resolution must be a positive multiple of 8, got {d.resolution}")
    if not 0.0 <= d.caption_dropout <= 1.0:
        raise ConfigError(f"diffusion.caption_dropout must be in [0, 1], got {d.caption_dropout}")
    if d.vae_batch_size < 0:
        raise ConfigError(f"diffusion.vae_batch_size must be >= 0, got {d.vae_batch_size}")
    if d.cache_shard_size < 1:
        raise ConfigError(f"diffusion.cache_shard_size must be >= 1, got {d.cache_shard_size}")
