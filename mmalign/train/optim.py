"""Optimizer and learning-rate schedule from `OptimConfig`."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from mmalign.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if cfg.fused and cfg.name not in ("adamw", "sgd"):
        from mmalign.errors import ConfigError

        raise ConfigError(f"optim.fused: torch has fused kernels for adamw and sgd, not {cfg.name}")
    fused = True if cfg.fused else None  # None: torch's default (foreach where supported)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw8bit":  # optimizer state in 8 bits: ~75 % less than AdamW's two fp32 moments
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            from mmalign.errors import ConfigError

            raise ConfigError("optim.name 'adamw8bit' needs bitsandbytes (pip install bitsandbytes; CUDA) "
                              "- or use adamw / adafactor") from e
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                   weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        # The official Diffusion-DPO SDXL settings: fixed lr, no relative step, clip threshold 1.
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False, clip_threshold=1.0)
    raise ValueError(f"unknown optimizer '{cfg.name}'")


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then
    constant, linear decay to 0, or cosine decay to 0 at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    if cfg.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if cfg.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
