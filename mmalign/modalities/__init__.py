"""Per-modality likelihoods. Each registry value names `module:function` (function defaults to
`build`), called as `build(cfg) -> (model, likelihood, processor)`; heavy libraries
(transformers, diffusers) are imported only when a modality is built. `build_source` gives the
online data source of the modalities that sample their own records."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmalign.types import DataSource, Likelihood

MODALITIES = {
    "causal_lm": "mmalign.modalities.causal_lm:build",
    "llava": "mmalign.modalities.llava:build",  # LLaVA-family VLMs (LLaVA-1.5, NeXT, ...): answer-only token log-probs
    "sd": "mmalign.modalities.diffusion:build",  # SD1.5 / SD2 (epsilon or v-prediction) UNets
    "sdxl": "mmalign.modalities.sdxl:build",  # SDXL UNet: two text encoders, add_time_ids
    "sd_spo": "mmalign.modalities.step_sampler:build",  # SPO / D3PO: sampled transitions, online rounds (SD1.5/SD2)
    "sdxl_spo": "mmalign.modalities.step_sampler:build_sdxl",  # SPO / D3PO on an SDXL UNet
    "sd3": "mmalign.modalities.flow:build",  # SD3 / SD3.5 flow transformer: CLIP-L + CLIP-G + T5, Flow-DPO
    "flux": "mmalign.modalities.flow:build_flux",  # FLUX.1 flow transformer: CLIP pooled + T5, 2x2 packing
    "audioldm2": "mmalign.modalities.audio:build",  # AudioLDM2 pipeline: mel-VAE latents, CLAP + T5 + GPT2 conditioning
    "tango": "mmalign.modalities.audio:build_tango",  # Tango-style: UNet2DConditionModel + T5 (masked), mel-VAE
}


def build_modality(cfg: Any) -> tuple[Any, Any, Any]:
    """(model, likelihood, processor) for `cfg.modality`."""
    if cfg.modality not in MODALITIES:
        raise ValueError(f"unknown modality '{cfg.modality}'; known: {', '.join(MODALITIES)}")
    module, _, function = MODALITIES[cfg.modality].partition(":")
    return getattr(importlib.import_module(module), function or "build")(cfg)


def build_source(cfg: Any, likelihood: Likelihood) -> DataSource | None:
    """The online `mmalign.types.DataSource` of `cfg.modality` (SPO / D3PO rounds for `sd_spo` and
    `sdxl_spo`), or None when the records come from `data.train`."""
    if cfg.modality in ("sd_spo", "sdxl_spo"):
        from mmalign.modalities.step_sampler import build_source as build_rounds

        return build_rounds(cfg, likelihood)
    return None
