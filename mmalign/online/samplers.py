"""The family's sampler of an online round, chosen by the family's descriptor (`Family.sample`:
"text", "images" or "audio", and `Family.kind`), never by family name.

A sampler turns one round's N samples (prompt, seed, id) into N manifest outputs with the
CURRENT policy (the caller puts it in eval mode under no grad):

- text (`Family.sample == "text"`, `Family.kind == "text"`: causal LMs): `generate_answers`,
  the code `mmalign generate` runs for text, one `torch.Generator` per sample seeded with its
  seed -> {"kind": "text", "text"};
- images (`Family.sample == "images"` with a `Family.pipeline`: SD, SDXL, SD3, FLUX, Z-Image):
  the family's diffusers pipeline built in memory from the likelihood's frozen parts and the
  policy denoiser (`sampling_pipeline`, as validation images), sampled with
  `generate_images` (one CPU generator per sample) -> a PNG under the round folder,
  {"kind": "image", "path": "media/<id>.png"} (relative to the round folder).

- vlm (`Family.sample == "text"`, `Family.kind == "vlm"`: LLaVA family): `online/vlm.py`, answers
  about each prompt's image (prompts are records with an image, `load_vlm_prompts`) -> {"kind": "text", "text"};
- audio (`Family.sample == "audio"`: AudioLDM2, Tango): `online/audio.py`, clips of the family's
  sampling loop around the policy UNet -> a WAV under the round folder, {"kind": "audio", "path"}.

`online_prompts` reads the round's prompts for the family: texts, plus per-prompt fields (a VLM's
images and annotation objects) that every sample row of the prompt carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mmalign.errors import ConfigError
from mmalign.families import Family
from mmalign.io import atomic_path


@dataclass
class SampleJob:
    """N samples of one round: prompts[i] sampled with seeds[i], named ids[i]; media go under
    `folder` (the round folder); fields[i]: the prompt's own fields (a VLM prompt's "images"),
    empty for text prompts."""

    prompts: list[str]
    seeds: list[int]
    ids: list[str]
    folder: Path
    fields: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SamplerContext:
    """What every sampler may read: the run's likelihood (frozen parts, prompt formatting), the
    family's processor (a tokenizer for text), the `online.sampling` settings, the batch size and
    whether prompts use the chat template (`data.chat_template`), the model folder (`model.path`:
    the audio sampler's vocoder)."""

    likelihood: Any
    processor: Any
    sampling: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    chat_template: bool = False
    model_path: str = ""


Sampler = Callable[[SamplerContext, torch.nn.Module, SampleJob], list[dict[str, Any]]]


def text_params(ctx: SamplerContext) -> dict[str, Any]:
    """`online.sampling` as `generate_answers` keywords (TEXT_SAMPLING defaults; an unknown key or
    a wrong type is a ConfigError naming `online.sampling`). The prompt template follows training."""
    from mmalign.generate.run import text_sampling

    try:
        params = text_sampling(ctx.sampling)
    except ConfigError as e:
        raise ConfigError(f"online.sampling: {e}") from None
    if "chat_template" not in ctx.sampling:
        params["chat_template"] = ctx.chat_template
    return params


def sample_text(ctx: SamplerContext, model: torch.nn.Module, job: SampleJob) -> list[dict[str, Any]]:
    """N answers of a causal LM, answer i drawn with its own generator seeded job.seeds[i]."""
    from mmalign.generate.text import generate_answers

    answers = generate_answers(model, ctx.processor, [{"prompt": p} for p in job.prompts], seeds=job.seeds,
                               batch_size=ctx.batch_size, **text_params(ctx))
    return [{"kind": "text", "text": a} for a in answers]


def image_call(ctx: SamplerContext, pipe: Any) -> dict[str, Any]:
    """The pipeline `__call__` arguments of `online.sampling` (checked against the pipeline: an
    unknown key is a ConfigError naming it); height and width default to `diffusion.resolution`."""
    from mmalign.generate.images import image_params

    params = dict(ctx.sampling)
    resolution = ctx.likelihood.settings.resolution
    params.setdefault("height", resolution)
    params.setdefault("width", resolution)
    try:
        return image_params(pipe, params)
    except ConfigError as e:
        raise ConfigError(f"online.sampling: {e}") from None


def sample_images(ctx: SamplerContext, model: torch.nn.Module, job: SampleJob) -> list[dict[str, Any]]:
    """N images of the family's pipeline around the policy denoiser `model`, image i drawn with a
    CPU generator seeded job.seeds[i]; each saved as job.folder/media/<id>.png (atomic)."""
    from mmalign.generate.images import generate_images
    from mmalign.modalities.validation import sampling_pipeline

    pipe = sampling_pipeline(ctx.likelihood, model)
    call = image_call(ctx, pipe)
    rows = []
    for start in range(0, len(job.prompts), ctx.batch_size):
        part = slice(start, start + ctx.batch_size)
        images = generate_images(pipe, job.prompts[part], job.seeds[part], call)
        for sample_id, image in zip(job.ids[part], images, strict=True):
            relative = f"media/{sample_id}.png"
            with atomic_path(job.folder / relative) as tmp:
                image.save(tmp, format="PNG")
            rows.append({"kind": "image", "path": relative})
    return rows


def sample_vlm(ctx: SamplerContext, model: torch.nn.Module, job: SampleJob) -> list[dict[str, Any]]:
    """N answers of a VLM about each prompt's images (`mmalign.online.vlm.sample_vlm`)."""
    from mmalign.online.vlm import sample_vlm as run

    return run(ctx, model, job)


def sample_audio(ctx: SamplerContext, model: torch.nn.Module, job: SampleJob) -> list[dict[str, Any]]:
    """N clips of an audio family (`mmalign.online.audio.sample_audio`)."""
    from mmalign.online.audio import sample_audio as run

    return run(ctx, model, job)


SAMPLERS: dict[str, Sampler] = {"text": sample_text, "images": sample_images, "vlm": sample_vlm,
                                "audio": sample_audio}


def sampler_name(family: Family) -> str:
    """The SAMPLERS key of `family`: its `sample`, or "vlm" for a VLM family that samples text."""
    return "vlm" if family.sample == "text" and family.kind == "vlm" else family.sample


def sampler_for(family: Family) -> Sampler:
    """The online sampler of `family`, from its descriptor (`sample`, `kind`, `pipeline`); a
    ConfigError (one line) for a family that cannot sample online in this version."""
    name = family.name
    if family.source is not None:
        raise ConfigError(f"modality '{name}' samples its own online data (spo:); remove the online section")
    key = sampler_name(family)
    if key not in SAMPLERS:
        what = family.sample or "nothing"
        raise ConfigError(f"online: modality '{name}' samples {what}; online rounds sample "
                          f"text, images or audio in this version")
    if family.sample == "text" and family.kind not in ("text", "vlm"):
        raise ConfigError(f"online: modality '{name}' is a {family.kind} family; online text rounds need a "
                          "causal LM or a VLM")
    if family.sample == "images" and family.pipeline is None:
        raise ConfigError(f"online: modality '{name}' has no diffusers pipeline to sample images with")
    return SAMPLERS[key]


def sample_kind(family: Family) -> str:
    """The manifest kind of the family's samples ("text", "image" or "audio"), what scorers must accept."""
    return "image" if family.sample == "images" else family.sample


def online_prompts(family: Family, settings: Any, keys: tuple[str, str] = ("online.prompts", "online.prompt_list")
                   ) -> tuple[list[str], list[dict[str, Any]]]:
    """(prompts, per-prompt fields) of `settings.prompts` / `settings.prompt_list` for `family`: a VLM's
    records with images and objects (`load_vlm_prompts`), else texts with no fields; `keys` name
    the file and list keys in errors (the training prompts' by default)."""
    if sampler_name(family) == "vlm":
        from mmalign.online.vlm import load_vlm_prompts

        return load_vlm_prompts(settings, keys)
    from mmalign.modalities.step_sampler import load_prompts

    prompts = load_prompts(settings, "online")
    return prompts, [{} for _ in prompts]
