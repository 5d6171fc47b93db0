"""SDXL (`modality: sdxl`): the shared Diffusion-DPO ELBO with SDXL's conditioning, METHODS.md §2:

- two text encoders (CLIPTextModel, CLIPTextModelWithProjection); for each the PENULTIMATE
  hidden state `hidden_states[-2]`, concatenated on the feature axis (768 + 1280 = 2048 for
  SDXL); the pooled `text_embeds` from the second encoder only;
- `add_time_ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]` per image, from
  the size the image was loaded at and the crop the draw chose (in the flipped image's
  coordinates when flipped), target = (resolution, resolution);
- UNet call: unet(x_t, t, encoder_hidden_states, added_cond_kwargs={"text_embeds", "time_ids"}).

Null prompt: encode("") (official training); `diffusion.null_prompt: zeros` matches the SDXL
pipeline's `force_zeros_for_empty_prompt` (zeros for BOTH the sequence and pooled embeddings).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.families.sd import CLIPText
from mmalign.modalities.diffusion import UNetCall, image_likelihood
from mmalign.modalities.loading import from_cache, load_parts


class SDXLText(CLIPText):
    """Both CLIP encoders, as StableDiffusionXLPipeline.encode_prompt: {"encoder_hidden_states":
    (n, L, D1 + D2), "text_embeds": (n, P)} float32 from input_ids and input_ids_2 (n, 77), each
    tokenizer padding to its model_max_length (`CLIPText.tokenize`)."""

    @torch.no_grad()
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden, pooled = [], None
        for i, encoder in enumerate(self.text_encoders):
            tokens = ids["input_ids" if i == 0 else f"input_ids_{i + 1}"].to(encoder.device)
            with torch.autocast(tokens.device.type, enabled=False):
                out = encoder(tokens, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled = getattr(out, "text_embeds", None)  # projected pooled output (CLIPTextModelWithProjection)
            pooled = (out.pooler_output if pooled is None else pooled).float()
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}


class SDXLUNet(UNetCall):
    """SDXL's UNet call with `added_cond_kwargs` and the size/crop micro-conditioning."""

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution

    def kwargs(self, values: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": values["encoder_hidden_states"].to(dtype),
                "added_cond_kwargs": {"text_embeds": values["text_embeds"].to(dtype),
                                      "time_ids": values["time_ids"].to(dtype)}}

    def extra_conditioning(self, inputs: dict[str, Any], crop_top_left: Tensor) -> dict[str, Tensor]:
        """{"time_ids": (N, 6) float32} = [orig_h, orig_w, crop_top, crop_left, res, res]."""
        original = inputs["original_sizes"].cpu()
        target = torch.full_like(original, self.resolution)
        time_ids = torch.cat([original, crop_top_left, target], dim=1).float()
        return {"time_ids": time_ids.to(inputs["original_sizes"].device)}

    def sampling_conditioning(self, n: int, resolution: int, device: torch.device) -> dict[str, Tensor]:
        """time_ids [res, res, 0, 0, res, res] of generated images (original = target, no crop),
        as the SDXL pipeline samples."""
        row = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        return {"time_ids": row.to(device).expand(n, 6)}


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable UNet, likelihood owning the VAE and both text encoders, None); from
    `diffusion.cache_dir` when set and use_cache (no VAE or text encoder loaded then)."""
    denoiser = SDXLUNet(cfg.diffusion.resolution)
    if from_cache(cfg, use_cache):
        from mmalign.modalities.diffusion_cache import build_cached

        return build_cached(cfg, FAMILY, denoiser, trained)
    parts = load_parts(cfg, FAMILY, unet=trained)
    likelihood = image_likelihood(cfg, FAMILY, parts, SDXLText(parts["text_encoders"], parts["tokenizers"]), denoiser)
    return parts["unet"], likelihood, None


FAMILY = Family(
    name="sdxl", summary="SDXL UNet: two CLIP text encoders, pooled embeddings, add_time_ids",
    kind="image", build=build, trained="unet", layout=PipelineLayout(),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:CLIPTextModel"),
                   TextEncoderSpec("text_encoder_2", "tokenizer_2", "transformers:CLIPTextModelWithProjection")),
    pipeline="StableDiffusionXLPipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images", null_prompt_zeros_flag=True)
