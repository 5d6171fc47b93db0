"""Images to watch during diffusion training (`train.validate_every`); video families (`Family.sample`
"videos") get a video grid and a frame contact sheet instead (validation_video.py).

`validate_images` puts the policy UNet (plain or peft-wrapped, adapters active) together with
the likelihood's frozen parts (VAE, text encoder(s), tokenizer(s)) into the matching diffusers
pipeline in memory (the family's `Family.pipeline`: StableDiffusionPipeline for SD1.5/SD2 with no
safety checker, StableDiffusionXLPipeline for SDXL, StableDiffusion3Pipeline / FluxPipeline for the
flow transformers),
samples every prompt × seed of the config with a fresh Euler scheduler (EulerDiscreteScheduler,
or FlowMatchEulerDiscreteScheduler for flow) made from the training scheduler's config, and
saves one PNG grid per call:
rows = prompts, columns = seeds. Each image has its own CPU generator seeded with its seed,
so the same weights give the same pixels in every call; only the weights change between steps.

The pipeline decodes its own latents (its family's VAE convention); `decode_latents` is the
shared decoder of scaled latents that SPO's step sampler and the step-aware scorer use.
"""

from __future__ import annotations

import json
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from mmalign.io import atomic_path
from mmalign.nn import eval_mode


def is_flow(family: Any) -> bool:
    """A flow family (its scheduler is flow matching): sampled with FlowMatchEulerDiscreteScheduler."""
    return family.layout.scheduler_class == "FlowMatchEulerDiscreteScheduler"


def sampling_scheduler(likelihood: Any) -> Any:
    """A fresh Euler sampler from the training scheduler's config: FlowMatchEulerDiscreteScheduler
    for the flow families, else EulerDiscreteScheduler with the likelihood's prediction type."""
    import diffusers

    family = likelihood.family
    if likelihood.scheduler.config.get("use_flow_sigmas", False):  # Wan's flow UniPC: a fresh copy of it
        return type(likelihood.scheduler).from_config(likelihood.scheduler.config)
    if is_flow(family):
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(likelihood.scheduler.config)
    config = {k: v for k, v in likelihood.scheduler.config.items() if k != "clip_sample"}  # DDPM-only key
    if family.pipeline == "StableDiffusionPipeline":
        config["steps_offset"] = 1  # what StableDiffusionPipeline.__init__ forces (with a warning) anyway
    return diffusers.EulerDiscreteScheduler.from_config(config, prediction_type=likelihood.prediction_type)


def text_parts(likelihood: Any) -> dict[str, Any]:
    """The pipeline's text encoder and tokenizer arguments (text_encoder, tokenizer, *_2, *_3), one
    pair per encoder of the family (`Family.text_encoders`); an optional encoder the folder lacks
    (SD3 without T5) gets None (the pipeline then feeds zeros, as training)."""
    encoders, tokenizers = likelihood.text_encoders, likelihood.tokenizers
    parts = {}
    for i in range(len(likelihood.family.text_encoders)):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts[f"text_encoder{suffix}"] = encoders[i] if i < len(encoders) else None
        parts[f"tokenizer{suffix}"] = tokenizers[i] if i < len(tokenizers) else None
    if likelihood.family.pipeline == "StableDiffusionPipeline":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return parts


@runtime_checkable
class PipelineOptions(Protocol):
    """A denoiser call whose pipeline needs constructor options beyond its components (the ones the
    folder's model_index.json gives `from_pretrained`), so an in-memory pipeline samples as trained."""

    def pipeline_options(self) -> dict[str, Any]:
        ...


def sampling_pipeline(likelihood: Any, unet: torch.nn.Module, pipeline: str = "", **extra: Any) -> Any:
    """The family's pipeline (`Family.pipeline`, or the diffusers class named `pipeline`: Wan's
    WanImageToVideoPipeline) of `likelihood`'s frozen parts, `unet` (the denoiser: a UNet, or the
    flow transformer) and `extra` constructor arguments (an edit pipeline's processor, Wan I2V's image
    encoder) in memory, nothing copied.

    A peft-wrapped UNet goes in as its base model: the LoRA layers are injected in place, so
    the pipeline samples with the adapters active."""
    import diffusers

    family = likelihood.family
    if likelihood.vae is None or not likelihood.text_encoders:
        raise ValueError("validation images need the VAE and text encoders (a run from diffusion.cache_dir has none)")
    from mmalign.modalities.experts import TwoExperts

    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    denoiser = base.pipeline_parts() if isinstance(base, TwoExperts) else {family.layout.denoiser: base}
    if family.null_prompt_zeros_flag:
        # Sample with the null prompt training used: SDXL's default feeds zeros for an empty
        # negative prompt, training drops captions to encode("") unless null_prompt is "zeros".
        denoiser["force_zeros_for_empty_prompt"] = likelihood.settings.null_prompt == "zeros"
    if isinstance(likelihood.denoiser, PipelineOptions):  # e.g. Wan 2.2 TI2V's expand_timesteps
        denoiser.update(likelihood.denoiser.pipeline_options())
    decode_in_vae_dtype(likelihood.vae)
    pipe = getattr(diffusers, pipeline or family.pipeline)(vae=likelihood.vae, scheduler=sampling_scheduler(likelihood),
                                               **denoiser, **text_parts(likelihood), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_CASTING: "weakref.WeakSet[Any]" = weakref.WeakSet()


def decode_in_vae_dtype(vae: Any) -> None:
    """Make `vae.decode` cast its latents to the VAE's own dtype first (once per VAE). The FLUX.2
    pipelines hand the VAE latents in the transformer's dtype, so a bfloat16 transformer beside a
    float32 VAE (`diffusion.vae_dtype`, the recipes' setting) failed in the VAE's first conv."""
    if vae in _CASTING:
        return
    decode = vae.decode

    def cast(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return decode(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = cast
    _CASTING.add(vae)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) scaled latents -> (n, 3, H, W) float32 images in [0, 1]."""
    latents = latents.float() / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents + shift
    with torch.autocast(latents.device.type, enabled=False):
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


def image_grid(images: torch.Tensor, columns: int) -> Any:
    """(n, 3, H, W) in [0, 1] -> one PIL image, `columns` images per row (row-major)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.zeros(3, rows * h, columns * w)
    for i, image in enumerate(images.cpu()):
        r, c = divmod(i, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def guidance_arguments(family: Any, guidance: float) -> dict[str, Any]:
    """The pipeline `__call__` arguments of classifier-free guidance `guidance`: `guidance_scale`,
    or for a true-CFG family (`Family.true_cfg`: Qwen-Image) `true_cfg_scale` with the empty
    negative prompt (the null prompt its training drops captions to)."""
    if family.true_cfg:
        return {"true_cfg_scale": guidance, "negative_prompt": "", "guidance_scale": None}
    return {"guidance_scale": guidance}


@torch.no_grad()
def sample_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: dict[str, Any],
                  resolution: int) -> torch.Tensor:
    """(len(prompts) · len(seeds), 3, H, W) float32 in [0, 1]: for each prompt, one image per seed;
    `guidance` from `guidance_arguments`.

    The pipeline decodes its own latents (output_type "pt"): each family's VAE convention
    (SD's scaling, SD3/FLUX's shift, FLUX's packing, Qwen-Image's per-channel mean/std and frame
    axis, FLUX.2's batch-norm statistics) lives in its pipeline, so no family needs a decoder here."""
    images = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        pixels = pipe(prompt=[prompt] * len(seeds), generator=generators, num_inference_steps=steps,
                      **guidance, height=resolution, width=resolution, output_type="pt",
                      return_dict=False)[0]
        images.append(pixels.float().cpu())
    return torch.cat(images)


def validate_images(likelihood: Any, unet: torch.nn.Module, step: int, folder: str | Path,
                    prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float) -> dict[str, float]:
    """Sample prompts × seeds with the current `unet` (eval mode, restored after) and write
    `folder/grid.png` (rows: prompts, columns: seeds) and `folder/grid.json` (its layout).

    Returns {"validation/images": n, "validation/seconds": s} for the metrics log."""
    if not likelihood.family.validation:
        warnings.warn(f"validation images are not implemented for modality '{likelihood.family.name}'; skipped")
        return {}
    from mmalign.modalities.edit import EditConditioning

    from mmalign.families._wan_i2v import WanI2VConditioning

    if isinstance(likelihood.conditioning, WanI2VConditioning):  # videos from training first frames (_wan_i2v.py)
        from mmalign.families._wan_i2v_validation import validate_i2v

        return validate_i2v(likelihood, unet, step, folder, seeds, steps, guidance)
    if isinstance(likelihood.conditioning, EditConditioning):  # edits of training sources (edit_validation.py)
        from mmalign.modalities.edit_validation import validate_edits

        return validate_edits(likelihood, unet, step, folder, seeds, steps, guidance)
    if likelihood.family.sample == "videos":  # a video grid (validation_video.py)
        from mmalign.modalities.validation_video import validate_videos

        return validate_videos(likelihood, unet, step, folder, prompts, seeds, steps, guidance)
    if not prompts or not seeds:
        raise ValueError("validation needs at least one prompt and one seed "
                         "(diffusion.validation_prompts, diffusion.validation_seeds)")
    tic = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    resolution = likelihood.settings.resolution
    with eval_mode(unet):  # LoRA dropout off: the same seeds give the same images
        images = sample_images(sampling_pipeline(likelihood, unet), prompts, seeds, steps,
                               guidance_arguments(likelihood.family, guidance), resolution)
    with atomic_path(folder / "grid.png") as tmp:
        image_grid(images, len(seeds)).save(tmp, format="PNG")
    layout = {"step": step, "rows": list(prompts), "columns": [int(s) for s in seeds], "steps": steps,
              "guidance": guidance, "resolution": resolution}
    (folder / "grid.json").write_text(json.dumps(layout, indent=2))
    return {"validation/images": float(images.shape[0]), "validation/seconds": time.perf_counter() - tic}
