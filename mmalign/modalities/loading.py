"""Loading a family's parts from a local diffusers folder (no downloads): the denoiser, the VAE,
the scheduler and the text encoders its `Family` descriptor names (`layout`, `text_encoders`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mmalign.families import Family, PipelineLayout, TextEncoderSpec


def family_folder(cfg: Any, family: Family) -> str:
    """`model.path` resolved, checked to be a local folder laid out as the family's (its denoiser
    subfolder inside); a ConfigError naming the path otherwise."""
    from mmalign.config import resolve_path
    from mmalign.errors import ConfigError

    path, layout = resolve_path(cfg.model.path), family.layout
    if not (Path(path) / layout.denoiser).is_dir():
        raise ConfigError(f"model.path {path} is not a local diffusers {layout.kind} folder "
                          f"(no {layout.denoiser}/ inside)")
    return path


def check_null_prompt(cfg: Any, family: Family) -> None:
    """`diffusion.null_prompt: zeros` for a family whose pipeline has no zero null prompt (it encodes
    the empty negative prompt, as caption dropout to "" trains it) is a ConfigError."""
    from mmalign.errors import ConfigError

    if cfg.diffusion.null_prompt == "zeros" and not family.zeros_null_prompt:
        raise ConfigError(f"diffusion.null_prompt: zeros has no counterpart in modality '{family.name}' (its "
                          "pipeline encodes the empty negative prompt, as caption dropout to \"\" trains it); "
                          "use 'empty'")


def import_class(spec: str) -> Any:
    """The class named "library:Class" (e.g. "transformers:CLIPTextModel")."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_parts(cfg: Any, family: Family, unet: bool = True, frozen: bool = True) -> dict[str, Any]:
    """Load the family's denoiser (key "unet", also for a flow transformer), vae (of `layout.vae_class`), scheduler and
    text encoders (`family.text_encoders`) from the local pipeline folder `cfg.model.path` (no
    downloads), laid out as `family.layout` says. An optional encoder whose folder is missing is
    skipped (SD3 without T5). unet=False skips the denoiser (`mmalign cache`), frozen=False the
    VAE, text encoders and tokenizers (training from a cache); a skipped part is None
    (text_encoders/tokenizers: [])."""
    import diffusers

    layout: PipelineLayout = family.layout
    check_null_prompt(cfg, family)
    path, d = family_folder(cfg, family), cfg.diffusion
    variant = {"variant": d.variant} if d.variant else {}
    dtype = getattr(torch, cfg.model.dtype)
    scheduler = getattr(diffusers, layout.scheduler_class).from_pretrained(path, subfolder="scheduler")
    parts: dict[str, Any] = {"unet": None, "vae": None, "text_encoders": [], "tokenizers": [], "scheduler": scheduler}
    if unet:
        parts["unet"] = getattr(diffusers, layout.denoiser_class).from_pretrained(
            path, subfolder=layout.denoiser, torch_dtype=dtype, **variant)
    if frozen:
        vae_path, vae_sub = (d.vae_path, None) if d.vae_path else (path, "vae")
        parts["vae"] = getattr(diffusers, layout.vae_class).from_pretrained(
            vae_path, subfolder=vae_sub, torch_dtype=getattr(torch, d.vae_dtype), **variant)
        present: list[TextEncoderSpec] = [e for e in family.text_encoders
                                          if e.required or (Path(path) / e.subfolder).is_dir()]
        parts["text_encoders"] = [import_class(e.cls).from_pretrained(path, subfolder=e.subfolder, dtype=dtype,
                                                                      **variant) for e in present]
        parts["tokenizers"] = [import_class(e.tokenizer_cls).from_pretrained(path, subfolder=e.tokenizer)
                               for e in present]
    return parts


def denoiser_config(cfg: Any, family: Family) -> SimpleNamespace:
    """The trainable denoiser's config (its config.json read by the family's denoiser class), with
    no weights loaded: what a build needs of it (text width, patch size, guidance embedding) also
    when it loads no denoiser (`mmalign cache`)."""
    import diffusers

    layout = family.layout
    cls = getattr(diffusers, layout.denoiser_class)
    return SimpleNamespace(**cls.load_config(family_folder(cfg, family), subfolder=layout.denoiser))


def from_cache(cfg: Any, use_cache: bool) -> bool:
    """Whether a build reads `diffusion.cache_dir` (set, and the caller wants the cache)."""
    return bool(use_cache and cfg.diffusion.cache_dir)
