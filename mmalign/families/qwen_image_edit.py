"""Qwen-Image-Edit (`modality: qwen_image_edit`): Flow-DPO on edit pairs {source_image, prompt, chosen,
rejected} (mmalign/modalities/edit.py) with the Qwen-Image transformer, the source image fed as
diffusers' QwenImageEditPipeline (pipelines/qwenimage/pipeline_qwenimage_edit.py, diffusers 0.42.1)
feeds it:

- the source: resized (PIL, lanczos: `image_processor.resize`) to calculate_dimensions(A, w/h) =
  round(√(A·r)/32)·32 × round(√(A/r)/32)·32 with A = resolution² (the pipeline's fixed 1024²
  at resolution 1024);
- conditioning (`_get_qwen_prompt_embeds`): the Qwen2.5-VL text encoder reads the edit template
  (system prompt, then "<|vision_start|><|image_pad|><|vision_end|>" + instruction as the user turn)
  through the pipeline's `processor` (Qwen2VLProcessor) WITH the resized source image; its last
  hidden state's real tokens minus the first 64 (`prompt_template_encode_start_idx`), right-padded to
  the batch's longest with a mask (None when all real); no max_sequence_length truncation (the edit
  pipeline has none);
- source latents: the Qwen VAE posterior mode of the resized source (`_encode_vae_image`,
  sample_mode "argmax"), normalised by latents_mean / latents_std, packed 2×2 and concatenated AFTER
  the noisy target's packed latents along the sequence; the transformer's `img_shapes` gets the
  source's grid as a second entry, [[(1, h/2, w/2), (1, h_s/2, w_s/2)]] per item, and only the
  first T = (h/2)·(w/2) output tokens are the prediction (`noise_pred[:, :latents.size(1)]`);
- the rest is Qwen-Image's (families/qwen_image.py): timestep σ, no guidance, target ε - x0 packed,
  the dynamic shift of the TARGET's token count (the pipeline's image_seq_len = latents.shape[1]).

Targets are resized (shortest side) and cropped to resolution×resolution (`QwenLatents`); the
pipeline samples such a target with height = width = resolution, which `mmalign generate` passes.
A random flip would mirror the target and not the source: refused. Dropped captions become the
empty instruction about the same source (the pipeline's negative prompt). `mmalign cache` stores
each record's conditioning and source latents (mmalign/modalities/edit_cache.py); validation grids
edit the first training records' sources (mmalign/modalities/edit_validation.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family
from mmalign.families.qwen_image import LAYOUT, TEXT_ENCODERS, QwenImageTransformer, QwenLatents, prompt_inputs
from mmalign.modalities.diffusion import DiffusionLikelihood, data_roots
from mmalign.modalities.edit import EditConditioning, check_edit_settings, rows_by_shape
from mmalign.modalities.edit_cache import build_edit_cached
from mmalign.modalities.edit_validation import validation_records
from mmalign.modalities.flow import flow_objective, pack_latents
from mmalign.modalities.loading import denoiser_config, family_folder, from_cache, load_parts

# QwenImageEditPipeline.__init__: the prompt template and the template tokens dropped
TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
            "background), then explain how the user's text instruction should alter or modify the image. Generate a "
            "new image that meets the user's requirements while maintaining consistency with the original input where "
            "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 64


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height), multiples of 32 of area ≈ `area` and width / height ≈ ratio (the pipeline's)."""
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def source_size(area: int, ratio: float) -> tuple[int, int]:
    """`calculate_dimensions`; a side rounded to 0 (an area too small for the ratio) is a ConfigError."""
    from mmalign.errors import ConfigError

    width, height = calculate_dimensions(area, ratio)
    if not width or not height:
        raise ConfigError(f"diffusion.resolution: a source of aspect ratio {ratio:.3g} sized to {area} pixels rounds "
                          f"to {width}x{height}; raise the resolution")
    return width, height


class QwenEditText:
    """The edit template read by Qwen2.5-VL with the source image, minus 64 tokens (module docstring);
    `prepare` resizes a source as the pipeline, `source_latents` encodes it with the Qwen VAE."""

    max_sources = 1

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any], processor: Any, latents: QwenLatents,
                 area: int) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self.text_encoders, self.tokenizers, self.processor = list(text_encoders), list(tokenizers), processor
        self.latents, self.area = latents, area
        factor = 2 ** len(latents.vae.config.temperal_downsample)
        self.image_processor = VaeImageProcessor(vae_scale_factor=factor * 2)

    def prepare(self, image: Any) -> tuple[Any, Tensor]:
        """(the resized PIL image, its pixels (3, h, w) in [-1, 1]) (`image_processor.preprocess`)."""
        width, height = source_size(self.area, image.width / image.height)
        resized = self.image_processor.resize(image, height, width)
        return resized, self.image_processor.preprocess(resized, height, width)[0]

    def texts(self, prompts: list[str], images: list[list[Any]]) -> list[str]:
        """The text encoder's input of each prompt: the edit template around it."""
        return [TEMPLATE.format(p) for p in prompts]

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[list[Any]]) -> dict[str, Tensor]:
        """{"prompt_embeds": (n, L, D) float32, "prompt_mask": (n, L) bool}, L the longest prompt's
        real tokens after the 64 dropped: `encode_prompt(prompts, image=...)` of the pipeline."""
        encoder = self.text_encoders[0]
        inputs = self.processor(text=self.texts(prompts, images), images=[i for item in images for i in item],
                                padding=True, return_tensors="pt").to(encoder.device)
        with torch.autocast(encoder.device.type, enabled=False):
            hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs["pixel_values"].to(encoder.dtype),
                             image_grid_thw=inputs["image_grid_thw"], output_hidden_states=True).hidden_states[-1]
        real = [h[m][DROP:] for h, m in zip(hidden, inputs["attention_mask"].bool())]
        length = max(r.shape[0] for r in real)
        embeds = hidden.new_zeros(len(real), length, hidden.shape[-1], dtype=torch.float32)
        mask = torch.zeros(len(real), length, dtype=torch.bool, device=hidden.device)
        for i, r in enumerate(real):
            embeds[i, : r.shape[0]], mask[i, : r.shape[0]] = r.float(), True
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def source_latents(self, pixels: Tensor) -> Tensor:
        """(n, z, h, w): the normalised posterior mode ((mean - μ) / σ, `QwenLatents.latent_dist`)."""
        return self.latents.latent_dist(pixels, pixels.shape[0])[0]

    def pipeline_parts(self) -> dict[str, Any]:
        """{"processor": the Qwen2VLProcessor} (the edit pipeline reads the source with it)."""
        return {"processor": self.processor}

    def pipeline_inputs(self, images: list[Any]) -> dict[str, Any]:
        """{"image": the source} (the pipeline resizes it to its own area, 1024²)."""
        return {"image": images[0]}


class QwenImageEditTransformer(QwenImageTransformer):
    """The edit pipeline's transformer call: [x_t packed; source packed] with both grids in img_shapes,
    the first T output tokens kept (module docstring); one call per distinct source size."""

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        """v_θ packed (N, h/2·w/2, 4C) float32 of x_t (N, C, h, w)."""
        dtype = next(model.parameters()).dtype
        _, _, h, w = noisy.shape
        target = pack_latents(noisy)
        out = target.new_zeros(target.shape, dtype=torch.float32)
        for rows, grids, length in rows_by_shape(values["source_shapes"].cpu()):
            rows = rows.to(noisy.device)
            embeds, mask = prompt_inputs({k: values[k][rows] for k in ("prompt_embeds", "prompt_mask")}, dtype)
            hidden = torch.cat([target[rows], values["source_latents"][rows, :length]], dim=1).to(dtype)
            shapes = [[(1, h // 2, w // 2), *[(1, a, b) for a, b in grids]]] * len(rows)
            pred = model(hidden_states=hidden, timestep=values["timesteps"][rows].to(dtype) / 1000, guidance=None,
                         encoder_hidden_states_mask=mask, encoder_hidden_states=embeds, img_shapes=shapes,
                         return_dict=False)[0]
            out[rows] = pred[:, : target.shape[1]].float()
        return out


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable QwenImageTransformer2DModel, edit likelihood owning the Qwen VAE, the Qwen2.5-VL
    text encoder and its processor, None)."""
    return build_qwen_edit(cfg, FAMILY, QwenEditText, trained, use_cache)


def build_qwen_edit(cfg: Any, family: Family, text_class: type, trained: bool,
                    use_cache: bool = True) -> tuple[Any, Any, None]:
    """`build` of a Qwen-Image edit family whose conditioning is `text_class` (a `QwenEditText`); from
    `diffusion.cache_dir` when set and use_cache (no VAE, Qwen2.5-VL or processor loaded then)."""
    from transformers import Qwen2VLProcessor

    from mmalign.errors import ConfigError

    check_edit_settings(cfg, family.name)
    d = cfg.diffusion
    if getattr(denoiser_config(cfg, family), "guidance_embeds", False):
        raise ConfigError("this QwenImageTransformer2DModel config has guidance_embeds, which diffusers' "
                          "transformer cannot feed (no guidance embedder)")
    objective_of = flow_objective(d.prediction_type, 2)
    if from_cache(cfg, use_cache):
        return build_edit_cached(cfg, family, QwenImageEditTransformer(), trained, objective_of)
    parts = load_parts(cfg, family, unet=trained)
    processor = Qwen2VLProcessor.from_pretrained(family_folder(cfg, family), subfolder="processor")
    latents = QwenLatents(parts["vae"], d, data_roots(cfg))
    text = text_class(parts["text_encoders"], parts["tokenizers"], processor, latents, d.resolution ** 2)
    objective = objective_of(parts["scheduler"], latents.latent_shape())
    conditioning = EditConditioning(text, latents, validation_records(cfg))
    likelihood = DiffusionLikelihood(family, objective, latents, conditioning, QwenImageEditTransformer(), d)
    return parts["unet"], likelihood, None


FAMILY = Family(
    name="qwen_image_edit",
    summary="Qwen-Image-Edit: Qwen2.5-VL reads the source image + instruction, source latents on the sequence",
    kind="image", build=build, trained="transformer", layout=LAYOUT, text_encoders=TEXT_ENCODERS,
    pipeline="QwenImageEditPipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images", zeros_null_prompt=False, true_cfg=True)
