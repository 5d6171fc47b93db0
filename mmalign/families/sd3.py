"""SD3 / SD3.5 (`modality: sd3`): Flow-DPO (`FlowObjective`, mmalign/modalities/flow.py) on an
`SD3Transformer2DModel`, with StableDiffusion3Pipeline.encode_prompt's conditioning:

    clip = cat(CLIP-L hidden_states[-2], CLIP-G hidden_states[-2]) on features (n, 77, D1+D2),
           zero-padded to T5's width D
    encoder_hidden_states = cat(clip, T5 last hidden) on the sequence axis (n, 77 + L_t5, D)
                            (no T5 in the folder: zeros (n, max_sequence_length, D), as the pipeline)
    pooled_projections = cat(text_embeds_L, text_embeds_G) (n, P1 + P2)

Transformer call: transformer(hidden_states=x_t, encoder_hidden_states, pooled_projections,
timestep=σ·1000) (the timestep stays float32: bf16 would round it). Shift: the scheduler's static
`shift` (3.0). T5 is padded to min(tokenizer max, 256), the pipeline's default max_sequence_length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.modalities.diffusion import UNetCall, image_likelihood
from mmalign.modalities.diffusion_cache import build_cached
from mmalign.modalities.flow import flow_objective, t5_hidden
from mmalign.modalities.loading import denoiser_config, from_cache, load_parts
from mmalign.modalities.text import pad_tokens


class SD3Text:
    """CLIP-L, CLIP-G [, T5] as the SD3 pipeline encodes them (module docstring).
    joint_attention_dim: the transformer's text width (the zeros standing in for a missing T5)."""

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any], joint_attention_dim: int,
                 max_sequence_length: int = 256) -> None:
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.joint_attention_dim, self.max_sequence_length = joint_attention_dim, max_sequence_length

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, 77), "input_ids_2": (n, 77)[, "input_ids_3": (n, L_t5)]}."""
        lengths = [tok.model_max_length for tok in self.tokenizers]
        if len(self.tokenizers) > 2:
            lengths[2] = min(lengths[2], self.max_sequence_length)
        return pad_tokens(self.tokenizers, lengths, prompts)

    @torch.no_grad()
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden, pooled = [], []
        for i, encoder in enumerate(self.text_encoders[:2]):
            tokens = ids["input_ids" if i == 0 else "input_ids_2"].to(encoder.device)
            with torch.autocast(tokens.device.type, enabled=False):
                out = encoder(tokens, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled.append(out[0].float())  # text_embeds: the projected pooled output
        clip = torch.cat(hidden, dim=-1)
        if len(self.text_encoders) > 2:
            t5 = t5_hidden(self.text_encoders[2], ids["input_ids_3"])
        else:
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length, self.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}


class SD3Transformer(UNetCall):
    """The SD3 transformer call (module docstring); prediction float32."""

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        dtype = next(model.parameters()).dtype
        return model(hidden_states=noisy.to(dtype), encoder_hidden_states=values["encoder_hidden_states"].to(dtype),
                     pooled_projections=values["pooled_projections"].to(dtype), timestep=values["timesteps"],
                     return_dict=False)[0].float()


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable SD3Transformer2DModel, likelihood owning the VAE and the CLIP-L, CLIP-G [, T5]
    text encoders, None); from `diffusion.cache_dir` when set and use_cache (no VAE or text
    encoder loaded then). The transformer's config gives the text width and the patch size."""
    transformer = denoiser_config(cfg, FAMILY)
    objective = flow_objective(cfg.diffusion.prediction_type, transformer.patch_size)

    if from_cache(cfg, use_cache):
        return build_cached(cfg, FAMILY, SD3Transformer(), trained, objective)
    parts = load_parts(cfg, FAMILY, unet=trained)
    text = SD3Text(parts["text_encoders"], parts["tokenizers"], transformer.joint_attention_dim)
    return parts["unet"], image_likelihood(cfg, FAMILY, parts, text, SD3Transformer(), objective), None


FAMILY = Family(
    name="sd3", summary="SD3 / SD3.5 flow transformer: CLIP-L + CLIP-G + T5, Flow-DPO",
    kind="image", build=build, trained="transformer",
    layout=PipelineLayout("transformer", "SD3Transformer2DModel", "FlowMatchEulerDiscreteScheduler", "flow pipeline"),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:CLIPTextModelWithProjection"),
                   TextEncoderSpec("text_encoder_2", "tokenizer_2", "transformers:CLIPTextModelWithProjection"),
                   TextEncoderSpec("text_encoder_3", "tokenizer_3", "transformers:T5EncoderModel", required=False)),
    pipeline="StableDiffusion3Pipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images")
