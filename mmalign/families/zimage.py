"""Z-Image (`modality: zimage`): Flow-DPO (`FlowObjective`, mmalign/modalities/flow.py) on a
`ZImageTransformer2DModel`, as diffusers' ZImagePipeline (pipelines/z_image/pipeline_z_image.py)
encodes and calls it:

- conditioning (`ZImagePipeline._encode_prompt`): each prompt as one user message through the
  tokenizer's chat template (add_generation_prompt=True, enable_thinking=True), padded to
  max_sequence_length 512 with its attention mask; the Qwen3 text encoder's hidden_states[-2]
  (n, L, D). The pipeline keeps each prompt's real tokens only (a list of (L_i, D)); here the
  padded (n, L, D) (zeros past the mask) and the mask (n, L) are kept and split per item at the call;
- the call (the denoising loop): transformer([x_t[i] as (C, 1, h, w)], (1000 - t)/1000 with
  t = σ·1000, i.e. 1 - σ, [prompt_embeds[i][mask[i]]], return_dict=False)[0], a list of
  (C, 1, h, w); the 2×2 patchify and the position ids (caption 1..L', image from L'+1, L' the
  caption padded to 32) happen inside the model (`patchify_and_embed`);
- sign: the model predicts x0 - ε = -(ε - x0) (the loop negates it before `scheduler.step`), so
  the target here is x0 - ε and mse is the model's own error (equal to mse(-out, ε - x0));
- shift: the scheduler config's, through `flow_shift` (Z-Image-Turbo: static 3.0; a dynamic
  config: mu of the (h/2)·(w/2) image tokens, as the pipeline's `calculate_shift`);
- no guidance embedding (the transformer has no guidance input; CFG lives in the loop).

Dropped captions become encode("") — the pipeline's negative prompt; `null_prompt: zeros` has no
pipeline counterpart (zero-length captions) and is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.modalities.diffusion import UNetCall, image_likelihood
from mmalign.modalities.diffusion_cache import build_cached
from mmalign.modalities.flow import flow_objective
from mmalign.modalities.loading import from_cache, load_parts
from mmalign.modalities.ragged import PaddedText, prefix_lengths
from mmalign.modalities.text import MASK, chat_tokens


class ZImageText(PaddedText):
    """Qwen3 hidden_states[-2] of the chat-templated prompt (module docstring), zeros past the mask (the
    call reads only the masked rows); `mmalign cache` stores each prompt at its real length (ragged.py)."""

    padded = ("prompt_embeds", "prompt_mask")

    def real_lengths(self, ids: dict[str, Tensor], cond: dict[str, Tensor]) -> Tensor:
        """(n,): each prompt's real tokens (the mask's, when they come first)."""
        return prefix_lengths(cond["prompt_mask"])

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any], max_sequence_length: int = 512) -> None:
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.max_sequence_length = max_sequence_length

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, L), "input_ids_mask": (n, L)}, L = max_sequence_length, padded as the pipeline."""
        return chat_tokens(self.tokenizers[0], prompts, self.max_sequence_length, enable_thinking=True)

    @torch.no_grad()
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"prompt_embeds": (n, L, D) float32, "prompt_mask": (n, L) bool}; the pipeline's list is
        [prompt_embeds[i][prompt_mask[i]]]."""
        encoder = self.text_encoders[0]
        tokens, mask = ids["input_ids"].to(encoder.device), ids[MASK].to(encoder.device).bool()
        with torch.autocast(tokens.device.type, enabled=False):
            hidden = encoder(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": hidden.float() * mask[..., None], "prompt_mask": mask}


def caption_list(values: dict[str, Tensor], dtype: torch.dtype) -> list[Tensor]:
    """[(L_i, D)]: each item's real caption tokens, as ZImagePipeline.encode_prompt returns them."""
    return [e[m].to(dtype) for e, m in zip(values["prompt_embeds"], values["prompt_mask"])]


class ZImageTransformer(UNetCall):
    """The Z-Image transformer call of the pipeline's denoising loop (module docstring)."""

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        """The raw model output (N, C, h, w) float32 (≈ x0 - ε) at x_t (N, C, h, w)."""
        dtype = next(model.parameters()).dtype
        latents = list(noisy.to(dtype).unsqueeze(2).unbind(dim=0))  # [(C, 1, h, w)]
        timestep = (1000 - values["timesteps"]) / 1000  # the loop's (1000 - t) / 1000 = 1 - σ
        out = model(latents, timestep, caption_list(values, dtype), return_dict=False)[0]
        return torch.stack([o.float() for o in out], dim=0).squeeze(2)

    def layout(self, target: Tensor) -> Tensor:
        """The objective's v = ε - x0 in the model's sign: x0 - ε."""
        return -target


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable ZImageTransformer2DModel, likelihood owning the VAE and the Qwen3 text encoder, None)."""
    objective = flow_objective(cfg.diffusion.prediction_type, 2)  # the model patchifies 2×2
    if from_cache(cfg, use_cache):
        return build_cached(cfg, FAMILY, ZImageTransformer(), trained, objective)
    parts = load_parts(cfg, FAMILY, unet=trained)
    text = ZImageText(parts["text_encoders"], parts["tokenizers"])
    return parts["unet"], image_likelihood(cfg, FAMILY, parts, text, ZImageTransformer(), objective), None


FAMILY = Family(
    name="zimage", summary="Z-Image single-stream DiT: Qwen3 chat-template prompt, Flow-DPO (model predicts x0 - eps)",
    kind="image", build=build, trained="transformer",
    layout=PipelineLayout("transformer", "ZImageTransformer2DModel", "FlowMatchEulerDiscreteScheduler", "flow pipeline"),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:Qwen3Model"),),
    pipeline="ZImagePipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images", zeros_null_prompt=False)
