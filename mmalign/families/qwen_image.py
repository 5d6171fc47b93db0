"""Qwen-Image (`modality: qwen_image`): Flow-DPO (`FlowObjective`, mmalign/modalities/flow.py) on a
`QwenImageTransformer2DModel`, as diffusers' QwenImagePipeline (pipelines/qwenimage/
pipeline_qwenimage.py, diffusers 0.42.1) encodes and calls it:

- conditioning (`_get_qwen_prompt_embeds` / `encode_prompt`): each prompt in the pipeline's
  system + user template (`prompt_template_encode`), tokenized with truncation at 1024 + 34 tokens,
  the Qwen2.5-VL text encoder's LAST hidden state (hidden_states[-1]) under its attention mask;
  each prompt's real tokens, minus the first 34 (`prompt_template_encode_start_idx`: the system
  prefix), truncated to max_sequence_length (512, the pipeline's `__call__` default). The pipeline
  right-pads them to the batch's longest with a long mask; here they are kept right-padded to 512
  ((n, 512, D) + bool mask (n, 512): fixed shapes for the draw, the null-prompt swap and the cache)
  and trimmed to the batch's longest at the call, the mask passed as None when it is all ones
  (what `encode_prompt` does);
- the call (the denoising loop): transformer(hidden_states = x_t packed 2×2 (N, h/2·w/2, 4C),
  timestep = t / 1000 with t = σ·1000, i.e. σ, guidance None, encoder_hidden_states_mask,
  encoder_hidden_states, img_shapes = [[(1, h/2, w/2)]] · N, return_dict=False)[0];
- sign: the output goes to `scheduler.step` as it is: the model predicts the velocity ε - x0,
  packed, so the target is packed the same way (`pack_latents`, QwenImagePipeline._pack_latents);
- shift: the scheduler config's dynamic shift (`flow_shift` of the packed sequence length
  (h/2)·(w/2), as the pipeline's `calculate_shift`; Qwen-Image: base 0.5 at 256 tokens, max 0.9
  at 8192, exponential); `shift_terminal` only stretches the sampling schedule;
- latents: `AutoencoderKLQwenImage` is a video VAE ((N, 3, 1, H, W) in, (N, z, 1, h, w) out) with
  per-channel `latents_mean` / `latents_std` instead of scaling_factor / shift_factor; the latent
  x0 = (z - mean) / std (pipeline_qwenimage_img2img.py `_encode_vae_image`; the pipeline decodes
  latents · std + mean). `QwenLatents` is `ImageLatents` with that posterior: it returns the
  posterior already normalised (mean' = (mean - μ)/σ, std' = std/σ, an exact change of variables)
  and scaling (None, 1.0), so the shared draw, `mmalign cache` and `CachedLatents` need nothing else;
- no guidance embedding: Qwen-Image's config has guidance_embeds false, and diffusers' transformer
  has no guidance embedder to feed (a config with it is refused).

Dropped captions become encode("") — the pipeline's negative prompt (true CFG); `null_prompt:
zeros` has no pipeline counterpart and is refused. Validation images sample
through `QwenImagePipeline` (which decodes its own latents), guided by `true_cfg_scale` with the
empty negative prompt (`Family.true_cfg`), the null prompt training used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.modalities.diffusion import ImageLatents, UNetCall, data_roots, image_likelihood
from mmalign.modalities.diffusion_cache import build_cached
from mmalign.modalities.flow import flow_objective, pack_latents
from mmalign.modalities.loading import denoiser_config, from_cache, load_parts
from mmalign.modalities.ragged import PaddedText, prefix_lengths
from mmalign.modalities.text import MASK

# QwenImagePipeline.__init__: the prompt template, the template tokens dropped, the tokenizer length
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34
TOKENIZER_MAX = 1024


class QwenImageText(PaddedText):
    """Qwen2.5-VL last hidden state of the templated prompt, minus the 34 template tokens (module docstring).
    `mmalign cache` stores prompt_embeds / prompt_mask at each prompt's real length (ragged.py)."""

    padded = ("prompt_embeds", "prompt_mask")

    def real_lengths(self, ids: dict[str, Tensor], cond: dict[str, Tensor]) -> Tensor:
        """(n,): each prompt's real tokens, the mask's count (embeds and mask are zero / False after)."""
        return prefix_lengths(cond["prompt_mask"])

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any], max_sequence_length: int = 512) -> None:
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.max_sequence_length = max_sequence_length

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, 1058), "input_ids_mask": (n, 1058)}: the templated prompts, truncated at
        1024 + 34 tokens as the pipeline, padded to that length (`encode` trims the padding)."""
        out = self.tokenizers[0]([TEMPLATE.format(p) for p in prompts], padding="max_length",
                                 max_length=TOKENIZER_MAX + DROP, truncation=True, return_tensors="pt")
        return {"input_ids": out.input_ids, MASK: out.attention_mask}

    @torch.no_grad()
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"prompt_embeds": (n, 512, D) float32, "prompt_mask": (n, 512) bool}: row i holds the
        pipeline's prompt_embeds[i] (its real tokens) first, zeros after."""
        encoder = self.text_encoders[0]
        tokens, mask = ids["input_ids"].to(encoder.device), ids[MASK].to(encoder.device)
        keep = mask.bool().any(dim=0)  # drop the columns that are padding in every row
        tokens, mask = tokens[:, keep], mask[:, keep]
        with torch.autocast(tokens.device.type, enabled=False):
            hidden = encoder(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        length = self.max_sequence_length
        embeds = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1], dtype=torch.float32)
        out_mask = torch.zeros(hidden.shape[0], length, dtype=torch.bool, device=hidden.device)
        for i, (h, m) in enumerate(zip(hidden, mask.bool())):
            real = h[m][DROP:][:length]  # _extract_masked_hidden, e[drop_idx:], [:max_sequence_length]
            embeds[i, : real.shape[0]], out_mask[i, : real.shape[0]] = real.float(), True
        return {"prompt_embeds": embeds, "prompt_mask": out_mask}


def prompt_inputs(values: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(prompt_embeds (N, L, D), mask (N, L) long or None) as `encode_prompt` returns them for the
    batch: trimmed to its longest prompt, the mask None when every token is real."""
    mask = values["prompt_mask"]
    longest = int(mask.sum(dim=1).max())
    embeds, mask = values["prompt_embeds"][:, :longest].to(dtype), mask[:, :longest]
    return embeds, (None if bool(mask.all()) else mask.long())


class QwenImageTransformer(UNetCall):
    """The Qwen-Image transformer call of the pipeline's denoising loop (module docstring)."""

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        """v_θ packed (N, h/2·w/2, 4C) float32 of x_t (N, C, h, w)."""
        dtype = next(model.parameters()).dtype
        n, _, h, w = noisy.shape
        embeds, mask = prompt_inputs(values, dtype)
        timestep = values["timesteps"].to(dtype) / 1000  # the loop's t / 1000 = σ
        return model(hidden_states=pack_latents(noisy).to(dtype), timestep=timestep, guidance=None,
                     encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                     img_shapes=[[(1, h // 2, w // 2)]] * n, return_dict=False)[0].float()

    def layout(self, target: Tensor) -> Tensor:
        return pack_latents(target)

    def latent_channels(self, config: Any) -> int:
        """in_channels counts the 2×2 packed channels (4C)."""
        return int(config.in_channels) // 4


class QwenLatents(ImageLatents):
    """`ImageLatents` through `AutoencoderKLQwenImage`: a frame axis of 1 and the per-channel
    latents_mean / latents_std normalisation folded into the posterior (module docstring)."""

    def latent_shape(self) -> tuple[int, int, int]:
        """(z_dim, res / f, res / f), f = 2^len(temperal_downsample) (the pipeline's vae_scale_factor)."""
        c = self.vae.config
        side = self.settings.resolution // 2 ** len(c.temperal_downsample)
        return (int(c.z_dim), side, side)

    def latent_scaling(self) -> tuple[float | None, float]:
        """The normalisation is already in `latent_dist`."""
        return None, 1.0

    def normalisation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        c = self.vae.config
        return (torch.tensor(c.latents_mean, device=device).view(1, -1, 1, 1),
                torch.tensor(c.latents_std, device=device).view(1, -1, 1, 1))

    @torch.no_grad()
    def latent_dist(self, pixels: Tensor, batch_size: int = 0) -> tuple[Tensor, Tensor]:
        """The normalised posterior of x0 = (z - μ) / σ: ((mean - μ) / σ, std / σ), (N, z, h, w)
        float32; the VAE in its dtype, autocast off, one frame, chunks of `diffusion.vae_batch_size`."""
        step = batch_size or self.settings.vae_batch_size or pixels.shape[0]
        means, stds = [], []
        with torch.autocast(pixels.device.type, enabled=False):
            for start in range(0, pixels.shape[0], step):
                chunk = pixels[start : start + step].to(self.vae.device, self.vae.dtype).unsqueeze(2)
                dist = self.vae.encode(chunk).latent_dist
                means.append(dist.mean.float()[:, :, 0])
                stds.append(dist.std.float()[:, :, 0])
        mean, std = torch.cat(means), torch.cat(stds)
        mu, sigma = self.normalisation(mean.device)
        return (mean - mu) / sigma, std / sigma


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable QwenImageTransformer2DModel, likelihood owning the Qwen VAE and the Qwen2.5-VL text
    encoder, None); from `diffusion.cache_dir` when set and use_cache (neither is loaded then)."""
    from mmalign.errors import ConfigError

    d = cfg.diffusion
    if getattr(denoiser_config(cfg, FAMILY), "guidance_embeds", False):
        raise ConfigError("this QwenImageTransformer2DModel config has guidance_embeds, which diffusers' "
                          "transformer cannot feed (no guidance embedder)")
    denoiser = QwenImageTransformer()
    objective = flow_objective(d.prediction_type, 2)  # 2×2 packing
    if from_cache(cfg, use_cache):
        return build_cached(cfg, FAMILY, denoiser, trained, objective)
    parts = load_parts(cfg, FAMILY, unet=trained)
    text = QwenImageText(parts["text_encoders"], parts["tokenizers"])
    latents = QwenLatents(parts["vae"], d, data_roots(cfg))
    return parts["unet"], image_likelihood(cfg, FAMILY, parts, text, denoiser, objective, latents), None


# the folder layout and text encoder of every Qwen-Image pipeline (the edit families share them)
LAYOUT = PipelineLayout("transformer", "QwenImageTransformer2DModel", "FlowMatchEulerDiscreteScheduler",
                        "flow pipeline", vae_class="AutoencoderKLQwenImage")
TEXT_ENCODERS = (TextEncoderSpec("text_encoder", "tokenizer", "transformers:Qwen2_5_VLForConditionalGeneration"),)

FAMILY = Family(
    name="qwen_image", summary="Qwen-Image MMDiT: Qwen2.5-VL templated prompt, 2x2 packing, Qwen video VAE, Flow-DPO",
    kind="image", build=build, trained="transformer", layout=LAYOUT, text_encoders=TEXT_ENCODERS,
    pipeline="QwenImagePipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images", zeros_null_prompt=False, true_cfg=True)
