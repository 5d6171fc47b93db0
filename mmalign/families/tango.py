"""Tango-style audio (`modality: tango`): a diffusers `UNet2DConditionModel` on a T5 / Flan-T5
encoder over AudioLDM log-mel latents (Tango 2, METHODS.md §2; the clip parts in
mmalign/modalities/audio.py). Conditioning: the encoder's last hidden state of each prompt alone
with its attention mask, passed as `encoder_attention_mask` (Tango's `boolean_encoder_mask`).
Folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/ [vocoder/]. diffusers has no Tango
pipeline: exports are component folders and adapters (`mmalign export`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.modalities.audio import MelLatents, PromptwiseText, check_audio_config, vocoder_config
from mmalign.modalities.diffusion import DiffusionLikelihood, ElboObjective, UNetCall, data_roots
from mmalign.modalities.loading import from_cache, load_parts


class T5Prompt:
    """{"encoder_hidden_states": (1, L, D) float32, "encoder_attention_mask": (1, L) long}: the T5
    encoder's last hidden state of one prompt (no padding) and its mask."""

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any]) -> None:
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)

    @torch.no_grad()
    def encode_one(self, prompt: str) -> dict[str, Tensor]:
        encoder, tokenizer = self.text_encoders[0], self.tokenizers[0]
        tokens = tokenizer([prompt], truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
        ids, mask = tokens.input_ids.to(encoder.device), tokens.attention_mask.to(encoder.device)
        with torch.autocast(ids.device.type, enabled=False):
            hidden = encoder(input_ids=ids, attention_mask=mask)[0].float()
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}


class TangoUNet(UNetCall):
    """unet(x_t, t, encoder_hidden_states, encoder_attention_mask)."""

    def kwargs(self, values: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": values["encoder_hidden_states"].to(dtype),
                "encoder_attention_mask": values["encoder_attention_mask"]}


def audio_likelihood(cfg: Any, family: Family, parts: dict[str, Any], encoder: Any, denoiser: Any,
                     path: str) -> DiffusionLikelihood:
    """A live audio likelihood: `MelLatents` through the loaded mel-VAE, `PromptwiseText` through
    the family's per-prompt encoder, the ELBO objective."""
    d = cfg.diffusion
    latents = MelLatents(parts["vae"], d, cfg.audio, vocoder_config(path), data_roots(cfg))
    return DiffusionLikelihood(family, ElboObjective(parts["scheduler"], d.prediction_type), latents,
                               PromptwiseText(encoder, cfg.audio.prompt_cache), denoiser, d)


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, DiffusionLikelihood, None]:
    """(trainable UNet, likelihood owning the mel-VAE and T5, None); from `diffusion.cache_dir`
    when set and use_cache (no VAE or text encoder loaded then)."""
    from mmalign.config import resolve_path

    check_audio_config(cfg)
    if from_cache(cfg, use_cache):
        from mmalign.modalities.audio_cache import build_cached_audio

        return build_cached_audio(cfg, FAMILY, TangoUNet(), trained)
    parts = load_parts(cfg, FAMILY, unet=trained)
    encoder = T5Prompt(parts["text_encoders"], parts["tokenizers"])
    return parts["unet"], audio_likelihood(cfg, FAMILY, parts, encoder, TangoUNet(), resolve_path(cfg.model.path)), None


FAMILY = Family(
    name="tango", summary="Tango-style audio: UNet2DConditionModel + T5 (masked), mel-VAE latents",
    kind="audio", build=build, trained="unet", layout=PipelineLayout(),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:T5EncoderModel"),),
    pipeline=None, export_formats=("merged", "unet", "lora"), cache=True, sample="audio",
    zeros_null_prompt=False)
