"""FLUX.1-Kontext (`modality: flux_kontext`): Flow-DPO on edit pairs {source_image, prompt, chosen,
rejected} (mmalign/modalities/edit.py) with a `FluxTransformer2DModel`, the source image fed as
diffusers' FluxKontextPipeline (pipelines/flux/pipeline_flux_kontext.py, diffusers 0.42.1) feeds it:

- the source: sized as the pipeline's `_auto_resize` (the PREFERRED_KONTEXT_RESOLUTIONS entry (w, h)
  of the nearest aspect ratio to the image's `get_default_height_width`, ties to the smaller w),
  scaled by resolution / 1024 (exact at resolution 1024), floored to multiples of 2·vae factor, then
  `image_processor.resize` + `preprocess`;
- source latents: (VAE mode - shift_factor) · scaling_factor (`_encode_vae_image`, sample_mode
  "argmax"), packed 2×2 and concatenated AFTER the noisy target's packed latents along the sequence;
  img_ids = [the target's (0, i, j) rows; the source's grid rows with the first coordinate 1]
  (`prepare_latents`: image_ids[..., 0] = 1); only the first T output tokens are the prediction;
- conditioning: FLUX's (families/flux.py: CLIP pooled + T5, the prompt alone: Kontext's text
  encoders never see the image); timestep σ, guidance embedding `guidance_scale` 3.5 (the pipeline's
  default) when the transformer has one, target ε - x0 packed, the dynamic shift of the TARGET's
  token count (the pipeline's image_seq_len = latents.shape[1]).

Targets are resized and cropped to resolution×resolution; `mmalign generate` samples the edit with
height = width = resolution and max_area = resolution² (the pipeline rescales its target to max_area,
1024² by default). A random flip is refused. `mmalign cache` stores each record's conditioning and source latents
(mmalign/modalities/edit_cache.py); validation grids edit the first training records' sources
(mmalign/modalities/edit_validation.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.families.flux import FluxText, FluxTransformer
from mmalign.modalities.diffusion import DiffusionLikelihood, ImageLatents, data_roots, vae_posterior
from mmalign.modalities.edit import EditConditioning, check_edit_settings, rows_by_shape
from mmalign.modalities.edit_cache import build_edit_cached
from mmalign.modalities.edit_validation import validation_records
from mmalign.modalities.flow import flow_objective, latent_image_ids, pack_latents
from mmalign.modalities.loading import denoiser_config, from_cache, load_parts


def kontext_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(width, height) of a source the pipeline's `_auto_resize` gives a (width, height) image (already
    floored to the VAE factor), its preferred resolution scaled by resolution / 1024."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    _, w, h = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    w, h = w * resolution // 1024, h * resolution // 1024
    return w // multiple * multiple, h // multiple * multiple


class KontextText(FluxText):
    """FLUX's prompt encoding (the instruction alone) plus the source's resize and VAE encoding
    (module docstring)."""

    max_sources = 1

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any], vae: Any, resolution: int) -> None:
        from diffusers.image_processor import VaeImageProcessor

        super().__init__(text_encoders, tokenizers)
        self.vae, self.resolution = vae, resolution
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.factor * 2)

    def resized(self, image: Any) -> Any:
        """The source as the pipeline's `_auto_resize` sizes it, scaled to the resolution (`kontext_size`)."""
        height, width = self.image_processor.get_default_height_width(image)
        width, height = kontext_size(width, height, self.resolution, self.factor * 2)
        return self.image_processor.resize(image, height, width)

    def prepare(self, image: Any) -> tuple[Any, Tensor]:
        """(None: the text encoders read no image, pixels (3, h, w) in [-1, 1])."""
        resized = self.resized(image)
        return None, self.image_processor.preprocess(resized, resized.height, resized.width)[0]

    def pipeline_parts(self) -> dict[str, Any]:
        return {}

    def pipeline_inputs(self, images: list[Any]) -> dict[str, Any]:
        """The source already sized as training sizes it, `_auto_resize` off (the pipeline keeps that
        size), and max_area = resolution² (the pipeline's target size)."""
        return {"image": self.resized(images[0]), "_auto_resize": False, "max_area": self.resolution ** 2}

    def encode(self, prompts: list[str], images: list[list[Any]]) -> dict[str, Tensor]:
        """FLUX's {"encoder_hidden_states", "pooled_projections"} of the prompts (`FluxText.encode`)."""
        return super().encode(self.tokenize(prompts))

    def source_latents(self, pixels: Tensor) -> Tensor:
        """(n, C, h, w): (posterior mode - shift_factor) · scaling_factor."""
        mean, _ = vae_posterior(self.vae, pixels)
        c = self.vae.config
        return (mean - c.shift_factor) * c.scaling_factor


class KontextTransformer(FluxTransformer):
    """The Kontext pipeline's transformer call (module docstring); one call per source size."""

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        """v_θ packed (N, h/2·w/2, 4C) float32 of x_t (N, C, h, w)."""
        dtype = next(model.parameters()).dtype
        _, _, h, w = noisy.shape
        target, text = pack_latents(noisy), values["encoder_hidden_states"]
        out = target.new_zeros(target.shape, dtype=torch.float32)
        for rows, grids, length in rows_by_shape(values["source_shapes"].cpu()):
            rows = rows.to(noisy.device)
            (a, b), = grids
            source_ids = latent_image_ids(2 * a, 2 * b)
            source_ids[:, 0] = 1
            guidance = torch.full((len(rows),), self.guidance_scale, device=noisy.device) if self.guidance_embeds \
                else None
            hidden = torch.cat([target[rows], values["source_latents"][rows, :length]], dim=1).to(dtype)
            pred = model(hidden_states=hidden, timestep=values["sigmas"][rows].float(), guidance=guidance,
                         pooled_projections=values["pooled_projections"][rows].to(dtype),
                         encoder_hidden_states=text[rows].to(dtype),
                         txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device),
                         img_ids=torch.cat([latent_image_ids(h, w), source_ids]).to(noisy.device),
                         return_dict=False)[0]
            out[rows] = pred[:, : target.shape[1]].float()
        return out


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable FluxTransformer2DModel, edit likelihood owning the VAE, CLIP and T5, None); from
    `diffusion.cache_dir` when set and use_cache (none of them loaded then)."""
    check_edit_settings(cfg, FAMILY.name)
    d = cfg.diffusion
    denoiser = KontextTransformer(bool(denoiser_config(cfg, FAMILY).guidance_embeds))
    objective_of = flow_objective(d.prediction_type, 2)
    if from_cache(cfg, use_cache):
        return build_edit_cached(cfg, FAMILY, denoiser, trained, objective_of)
    parts = load_parts(cfg, FAMILY, unet=trained)
    latents = ImageLatents(parts["vae"], d, data_roots(cfg))
    text = KontextText(parts["text_encoders"], parts["tokenizers"], parts["vae"], d.resolution)
    objective = objective_of(parts["scheduler"], latents.latent_shape())
    conditioning = EditConditioning(text, latents, validation_records(cfg))
    likelihood = DiffusionLikelihood(FAMILY, objective, latents, conditioning, denoiser, d)
    return parts["unet"], likelihood, None


FAMILY = Family(
    name="flux_kontext", summary="FLUX.1-Kontext: CLIP pooled + T5 instruction, source latents on the sequence (ids 1)",
    kind="image", build=build, trained="transformer",
    layout=PipelineLayout("transformer", "FluxTransformer2DModel", "FlowMatchEulerDiscreteScheduler", "flow pipeline"),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:CLIPTextModel"),
                   TextEncoderSpec("text_encoder_2", "tokenizer_2", "transformers:T5EncoderModel")),
    pipeline="FluxKontextPipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images")
