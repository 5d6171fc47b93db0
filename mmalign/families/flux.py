"""FLUX.1 (`modality: flux`): Flow-DPO (`FlowObjective`, mmalign/modalities/flow.py) on a
`FluxTransformer2DModel`, as FluxPipeline encodes and calls it:

- conditioning (FluxPipeline.encode_prompt): CLIP (`CLIPTextModel`) pooler_output as
  pooled_projections (n, P); T5 last hidden state as encoder_hidden_states (n, L_t5, D),
  T5 padded to min(tokenizer max, 512), the pipeline's default max_sequence_length;
- latents packed 2×2 into (N, h/2·w/2, 4C) with img_ids (the packed grid's (0, i, j) rows) and
  txt_ids zeros (L_t5, 3); the target is packed the same way (a permutation: the mean is unchanged);
- the timestep is σ (the model multiplies by 1000); guidance embedding `guidance_scale`
  (diffusers' FLUX training default 3.5) when the transformer config has `guidance_embeds`
  (FLUX.1-dev has one, schnell not);
- shift: resolution-dependent (`flow_shift` of the packed sequence length (h/2)·(w/2)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.modalities.diffusion import UNetCall, image_likelihood
from mmalign.modalities.diffusion_cache import build_cached
from mmalign.modalities.flow import flow_objective, latent_image_ids, pack_latents, t5_hidden
from mmalign.modalities.loading import denoiser_config, from_cache, load_parts
from mmalign.modalities.text import pad_tokens


class FluxText:
    """CLIP pooled + T5 sequence (module docstring)."""

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any], max_sequence_length: int = 512) -> None:
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.max_sequence_length = max_sequence_length

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, 77) CLIP, "input_ids_2": (n, L_t5) T5}."""
        lengths = [tok.model_max_length for tok in self.tokenizers]
        lengths[-1] = min(lengths[-1], self.max_sequence_length)
        return pad_tokens(self.tokenizers, lengths, prompts)

    @torch.no_grad()
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"encoder_hidden_states": (n, L_t5, D), "pooled_projections": (n, P)} float32."""
        clip, t5 = self.text_encoders
        tokens = ids["input_ids"].to(clip.device)
        with torch.autocast(tokens.device.type, enabled=False):
            pooled = clip(tokens).pooler_output.float()
        return {"encoder_hidden_states": t5_hidden(t5, ids["input_ids_2"]), "pooled_projections": pooled}


class FluxTransformer(UNetCall):
    """The FLUX transformer call on packed latents (module docstring)."""

    def __init__(self, guidance_embeds: bool, guidance_scale: float = 3.5) -> None:
        self.guidance_embeds, self.guidance_scale = guidance_embeds, guidance_scale

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        """v_θ packed (N, h/2·w/2, 4C) float32 of x_t (N, C, h, w)."""
        dtype = next(model.parameters()).dtype
        n, _, h, w = noisy.shape
        guidance = torch.full((n,), self.guidance_scale, device=noisy.device) if self.guidance_embeds else None
        text = values["encoder_hidden_states"]
        return model(hidden_states=pack_latents(noisy).to(dtype), timestep=values["sigmas"].float(), guidance=guidance,
                     pooled_projections=values["pooled_projections"].to(dtype), encoder_hidden_states=text.to(dtype),
                     txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device),
                     img_ids=latent_image_ids(h, w).to(noisy.device), return_dict=False)[0].float()

    def layout(self, target: Tensor) -> Tensor:
        return pack_latents(target)

    def latent_channels(self, config: Any) -> int:
        """in_channels counts the 2×2 packed channels (4C)."""
        return int(config.in_channels) // 4


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable FluxTransformer2DModel, likelihood owning the VAE, CLIP and T5, None); from
    `diffusion.cache_dir` when set and use_cache (no VAE or text encoder loaded then)."""
    denoiser = FluxTransformer(bool(denoiser_config(cfg, FAMILY).guidance_embeds))
    objective = flow_objective(cfg.diffusion.prediction_type, 2)  # 2×2 packing
    if from_cache(cfg, use_cache):
        return build_cached(cfg, FAMILY, denoiser, trained, objective)
    parts = load_parts(cfg, FAMILY, unet=trained)
    text = FluxText(parts["text_encoders"], parts["tokenizers"])
    return parts["unet"], image_likelihood(cfg, FAMILY, parts, text, denoiser, objective), None


FAMILY = Family(
    name="flux", summary="FLUX.1 flow transformer: CLIP pooled + T5, 2x2 latent packing, guidance embedding",
    kind="image", build=build, trained="transformer",
    layout=PipelineLayout("transformer", "FluxTransformer2DModel", "FlowMatchEulerDiscreteScheduler", "flow pipeline"),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:CLIPTextModel"),
                   TextEncoderSpec("text_encoder_2", "tokenizer_2", "transformers:T5EncoderModel")),
    pipeline="FluxPipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True, sample="images")
