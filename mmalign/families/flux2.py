"""FLUX.2 [klein] (`modality: flux2`): Flow-DPO (`FlowObjective`, mmalign/modalities/flow.py) on a
`Flux2Transformer2DModel`, as diffusers' Flux2KleinPipeline (pipelines/flux2/pipeline_flux2_klein.py)
encodes and calls it, and as diffusers' examples/dreambooth/train_dreambooth_lora_flux2_klein.py
trains it:

- conditioning (`_get_qwen3_prompt_embeds`): each prompt as one user turn through the tokenizer's
  chat template (add_generation_prompt=True, enable_thinking=False), padded to max_sequence_length
  512 with its attention mask; the Qwen3 hidden_states of layers (9, 18, 27) stacked and flattened
  per token: (n, L, 3·D) (`prompt_embeds`); txt_ids (n, L, 4) rows (0, 0, 0, l) (`_prepare_text_ids`);
- latents: the VAE (`AutoencoderKLFlux2`, 32 channels) posterior patchified 2×2 into 128 channels
  (`_patchify_latents`: channel c·4 + 2·i + j) and normalised by the VAE's batch norm statistics,
  (z - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps) (`_encode_vae_image`, the training
  script); the VAE config has no scaling / shift factor. `Flux2Latents` gives `ImageLatents`' draw
  that space: posterior mean and std patchified and normalised (a Gaussian stays one under a
  permutation and a per-channel affine map), scaling (None, 1.0);
- the call: hidden_states = the (N, 128, h, w) latents packed as (N, h·w, 128) (`_pack_latents`: a
  plain flatten, no 2×2 packing: the VAE patchified already), img_ids (N, h·w, 4) rows (0, i, j, 0)
  (`_prepare_latent_ids`), timestep t/1000 = σ (the loop's `timestep / 1000` of the scheduler's
  σ·1000), guidance None unless the transformer config has `guidance_embeds` (then
  `guidance_scale`, as the training script); the output's first h·w tokens (the loop's
  `noise_pred[:, : latents.size(1)]`) are v = ε - x0 (the loop hands it to the Euler step as is);
  the target is packed the same way (a permutation: mse unchanged);
- shift: the scheduler config's dynamic shift of the h·w image tokens (`flow_shift`, as FLUX.1).
  The pipeline's `compute_empirical_mu(image_seq_len, num_steps)` is a sampling schedule of the
  step count; the training script draws σ from the scheduler's unshifted sigmas.

Dropped captions become encode("") — the pipeline's negative prompt; `null_prompt: zeros` has no
pipeline counterpart and is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.modalities.diffusion import ImageLatents, UNetCall, data_roots, image_likelihood, vae_latent_shape
from mmalign.modalities.diffusion_cache import build_cached
from mmalign.modalities.flow import flow_objective
from mmalign.modalities.loading import denoiser_config, from_cache, load_parts
from mmalign.modalities.text import MASK, chat_tokens

KLEIN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline.encode_prompt's text_encoder_out_layers


# -- the latent space ------------------------------------------------------------------------------
def patchify(latents: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2), as Flux2Pipeline._patchify_latents."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def bn_stats(vae: Any) -> tuple[Tensor, Tensor]:
    """The VAE batch norm's mean and std (1, 4C, 1, 1) float32: sqrt(running_var + batch_norm_eps)."""
    mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


class Flux2Latents(ImageLatents):
    """`ImageLatents` in FLUX.2's latent space: the posterior patchified 2×2 and normalised by the
    VAE's batch norm statistics (module docstring); the draw, the augmentation and the cache are
    `ImageLatents`'."""

    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = vae_latent_shape(self.vae.config, self.settings.resolution)
        return (4 * c, h // 2, w // 2)

    def latent_scaling(self) -> tuple[float | None, float]:
        return None, 1.0  # the normalisation is in latent_dist

    def latent_dist(self, pixels: Tensor, batch_size: int = 0) -> tuple[Tensor, Tensor]:
        """Mean, std (N, 4C, h/2, w/2) float32 of (patchify(z) - bn_mean) / bn_std, z ~ the posterior."""
        mean, std = super().latent_dist(pixels, batch_size)
        bn_mean, bn_std = (s.to(mean.device) for s in bn_stats(self.vae))
        return (patchify(mean) - bn_mean) / bn_std, patchify(std) / bn_std


# -- the prompt ------------------------------------------------------------------------------------
def stack_layers(hidden_states: Sequence[Tensor], layers: Sequence[int]) -> Tensor:
    """(n, L, len(layers)·D): the layers' states side by side per token, as the pipeline stacks them."""
    out = torch.stack([hidden_states[k] for k in layers], dim=1)  # (n, K, L, D)
    n, k, length, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(n, length, k * d)


class Flux2KleinText:
    """Qwen3 hidden states of layers (9, 18, 27) of the chat-templated prompt (module docstring)."""

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any], max_sequence_length: int = 512,
                 layers: Sequence[int] = KLEIN_LAYERS) -> None:
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.max_sequence_length, self.layers = max_sequence_length, tuple(layers)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, L), "input_ids_mask": (n, L)}, L = max_sequence_length, padded as the pipeline."""
        return chat_tokens(self.tokenizers[0], prompts, self.max_sequence_length, enable_thinking=False)

    @torch.no_grad()
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"prompt_embeds": (n, L, 3·D) float32}: the pipeline's prompt_embeds (padding included)."""
        encoder = self.text_encoders[0]
        tokens, mask = ids["input_ids"].to(encoder.device), ids[MASK].to(encoder.device)
        with torch.autocast(tokens.device.type, enabled=False):
            out = encoder(input_ids=tokens, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return {"prompt_embeds": stack_layers(out.hidden_states, self.layers).float()}


# -- the transformer call --------------------------------------------------------------------------
def pack(latents: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h·w, C), as Flux2Pipeline._pack_latents."""
    n, c, h, w = latents.shape
    return latents.reshape(n, c, h * w).permute(0, 2, 1)


def text_ids(n: int, length: int) -> Tensor:
    """(n, L, 4) int64 rows (0, 0, 0, l), as Flux2Pipeline._prepare_text_ids."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.expand(n, -1, -1)


def latent_ids(n: int, h: int, w: int) -> Tensor:
    """(n, h·w, 4) int64 rows (0, i, j, 0) row-major, as Flux2Pipeline._prepare_latent_ids."""
    ids = torch.zeros(h, w, 4, dtype=torch.long)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(1, h * w, 4).expand(n, -1, -1)


class Flux2Transformer(UNetCall):
    """The Flux2Transformer2DModel call of the pipeline's denoising loop (module docstring)."""

    def __init__(self, guidance_embeds: bool, guidance_scale: float = 1.0) -> None:
        self.guidance_embeds, self.guidance_scale = guidance_embeds, guidance_scale

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        """v_θ packed (N, h·w, C) float32 of x_t (N, C, h, w)."""
        dtype = next(model.parameters()).dtype
        n, _, h, w = noisy.shape
        text, device = values["prompt_embeds"], noisy.device
        guidance = torch.full((n,), self.guidance_scale, device=device) if self.guidance_embeds else None
        out = model(hidden_states=pack(noisy).to(dtype), timestep=values["timesteps"] / 1000, guidance=guidance,
                    encoder_hidden_states=text.to(dtype), txt_ids=text_ids(n, text.shape[1]).to(device),
                    img_ids=latent_ids(n, h, w).to(device), return_dict=False)[0]
        return out[:, : h * w].float()

    def layout(self, target: Tensor) -> Tensor:
        return pack(target)


# -- the family ------------------------------------------------------------------------------------
def build_flux2(cfg: Any, family: Family, text: Callable[[list[Any], list[Any]], Any], guidance_scale: float,
                use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable Flux2Transformer2DModel, likelihood owning the FLUX.2 VAE and `text`(encoders,
    tokenizers), None) of a FLUX.2 `family` (klein, dev); the guidance embedding, where the
    transformer config has one, gets `guidance_scale`; from `diffusion.cache_dir` when set and
    use_cache (no VAE or text encoder loaded then)."""
    d = cfg.diffusion
    denoiser = Flux2Transformer(bool(denoiser_config(cfg, family).guidance_embeds), guidance_scale)
    objective = flow_objective(d.prediction_type, 1)  # the latents are patchified already: h·w tokens
    if from_cache(cfg, use_cache):
        return build_cached(cfg, family, denoiser, trained, objective)
    parts = load_parts(cfg, family, unet=trained)
    latents = Flux2Latents(parts["vae"], d, data_roots(cfg))
    encoder = text(parts["text_encoders"], parts["tokenizers"])
    return parts["unet"], image_likelihood(cfg, family, parts, encoder, denoiser, objective, latents), None


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """FLUX.2 [klein]: `build_flux2` with the Qwen3 prompt encoding (a klein transformer config has
    no guidance embedding; were one there it would get 1.0)."""
    return build_flux2(cfg, FAMILY, Flux2KleinText, 1.0, use_cache, trained)


FAMILY = Family(
    name="flux2", summary="FLUX.2 [klein] flow transformer: Qwen3 layers 9/18/27, bn-normalised 2x2-patchified "
                          "latents, Flow-DPO",
    kind="image", build=build, trained="transformer",
    layout=PipelineLayout("transformer", "Flux2Transformer2DModel", "FlowMatchEulerDiscreteScheduler", "flow pipeline",
                          vae_class="AutoencoderKLFlux2"),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:Qwen3ForCausalLM"),),
    pipeline="Flux2KleinPipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images", zeros_null_prompt=False)
