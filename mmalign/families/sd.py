"""Stable Diffusion 1.x / 2.x (`modality: sd`): a UNet2DConditionModel on one CLIP text encoder,
ε or v-prediction (`DiffusionLikelihood` with the ELBO objective, METHODS.md §2).

Conditioning: the CLIP text encoder's last hidden state of the prompt padded to 77 tokens,
exactly as StableDiffusionPipeline.encode_prompt. UNet call: unet(x_t, t, encoder_hidden_states).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.modalities.diffusion import UNetCall, image_likelihood
from mmalign.modalities.text import pad_tokens
from mmalign.modalities.loading import from_cache, load_parts


class CLIPText:
    """One CLIP text encoder: {"encoder_hidden_states": (n, 77, D)} float32, its last hidden state;
    every tokenizer pads to its model_max_length (77), as the SD pipelines do."""

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any]) -> None:
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        return pad_tokens(self.tokenizers, [t.model_max_length for t in self.tokenizers], prompts)

    @torch.no_grad()
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        encoder = self.text_encoders[0]
        tokens = ids["input_ids"].to(encoder.device)
        with torch.autocast(tokens.device.type, enabled=False):
            return {"encoder_hidden_states": encoder(tokens)[0].float()}


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable UNet, likelihood owning the VAE and the text encoder, None); from
    `diffusion.cache_dir` when set and use_cache (no VAE or text encoder loaded then)."""
    if from_cache(cfg, use_cache):
        from mmalign.modalities.diffusion_cache import build_cached

        return build_cached(cfg, FAMILY, UNetCall(), trained)
    parts = load_parts(cfg, FAMILY, unet=trained)
    likelihood = image_likelihood(cfg, FAMILY, parts, CLIPText(parts["text_encoders"], parts["tokenizers"]),
                                  UNetCall())
    return parts["unet"], likelihood, None


FAMILY = Family(
    name="sd", summary="Stable Diffusion 1.x / 2.x UNet (epsilon or v-prediction), one CLIP text encoder",
    kind="image", build=build, trained="unet", layout=PipelineLayout(),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:CLIPTextModel"),),
    pipeline="StableDiffusionPipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images")
