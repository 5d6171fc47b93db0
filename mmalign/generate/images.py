"""Images from diffusers text-to-image pipelines loaded from a local folder.

`load_pipeline` takes a pipeline folder with a `model_index.json` (what `save_pretrained`
and `mmalign export --format merged` write; loaded with `DiffusionPipeline.from_pretrained`)
or a component-only folder like the shipped `pkg://tiny_sdxl` (unet/ or transformer/, vae/,
scheduler/, text_encoder*/ and tokenizer*/), whose pipeline class is the matching family's
(`mmalign.families.family_for_folder`: the denoiser's class and the text encoder folders, e.g.
StableDiffusionXLPipeline for a unet/ with two text encoders; no safety checker for SD).

`generate_images` gives every image its own CPU `torch.Generator` seeded with its own seed
(diffusers draws each image's initial latents, and each stochastic scheduler step's noise,
from its generator), so an image depends on its prompt, seed and parameters, not on the other
images of its batch or on the device's RNG.

Edit models: a prompt record with `source_image` (or `source_images`) is sampled with the pipeline's
`image=` set to its source(s) (`edit_sources`). QwenImageEditPipeline and FluxKontextPipeline take one
source per prompt: one pipeline call per source size (they size a batch by its first image); several
sources for them is a DataError naming the sample. QwenImageEditPlusPipeline takes all of a prompt's
sources as `image=[source_1, ..., source_K]` and refuses batches of prompts (batch_size > 1), so it is
called once per sample (its Qwen2.5-VL prompt encoding and the sources' VAE encoding are redone for each
sample of a prompt). The manifest row keeps the source path(s), so `mmalign build-pairs scores` writes
edit pairs {source_image | source_images, prompt, chosen, rejected}.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from mmalign.errors import ConfigError
from mmalign.families import family_for_folder, family_for_pipeline

# pipeline __call__ arguments that `generate_images` sets itself (not sampling parameters)
RESERVED = {"prompt", "prompt_2", "prompt_3", "generator", "output_type", "return_dict", "latents",
            "num_images_per_prompt", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
            "negative_pooled_prompt_embeds", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
            "callback", "callback_steps", "ip_adapter_image", "ip_adapter_image_embeds", "image"}
# parameters recorded in every manifest row even when left at the pipeline's default
RECORDED = ("num_inference_steps", "guidance_scale", "height", "width")
AUDIO_WORDS = ("Audio", "MusicLDM")  # audio pipelines of no registered family (MusicLDM, AudioLDM 1)
# edit pipelines whose `image=` list holds the several sources of ONE prompt (and that sample one prompt per call)
MULTI_SOURCE = frozenset({"QwenImageEditPlusPipeline"})


def _config_class(file: Path, key: str = "_class_name") -> str | None:
    return json.loads(file.read_text()).get(key) if file.is_file() else None


def pipeline_class_name(path: str | Path) -> str:
    """The diffusers pipeline class of a local folder (see module docstring)."""
    path = Path(path)
    name = _config_class(path / "model_index.json")
    if name:
        return name
    family = family_for_folder(path)
    if family is None or family.pipeline is None:
        raise ConfigError(f"{path} is not a diffusers pipeline folder of a known family (no model_index.json; "
                          "its unet/ or transformer/ and text encoders match no family's layout): add a "
                          "model_index.json")
    return family.pipeline


def is_audio_name(name: str) -> bool:
    """A pipeline class that samples audio: its family's `sample` ("audio"), or, for a pipeline of
    no registered family, an audio word in its name."""
    family = family_for_pipeline(name)
    return family.sample == "audio" if family is not None else any(word in name for word in AUDIO_WORDS)


def is_audio_pipeline(path: str | Path) -> bool:
    return is_audio_name(pipeline_class_name(path))


def _load_components(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Every component subfolder of `path`, loaded with the class its config names."""
    import importlib

    from mmalign.export import _component_class

    parts = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _component_class(folder)
        if found is None:
            continue
        library, name = found
        cls = getattr(importlib.import_module(library), name)
        kwargs = {"torch_dtype": dtype} if library == "diffusers" and folder.name != "scheduler" else {}
        if library == "transformers" and hasattr(cls, "get_input_embeddings"):
            kwargs = {"dtype": dtype}
        parts[folder.name] = cls.from_pretrained(path, subfolder=folder.name, **kwargs)
    return parts


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, scheduler: str = "") -> Any:
    """A diffusers pipeline from a local folder (no downloads, no safety checker added);
    `scheduler` names a diffusers scheduler class to sample with instead of the folder's."""
    import diffusers

    path = Path(path)
    name = pipeline_class_name(path)
    if is_audio_name(name):
        raise ConfigError(f"{path}: {name} is an audio pipeline: generate it with kind audio")
    if (path / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    else:
        cls = getattr(diffusers, name)
        parts = _load_components(path, dtype)
        accepted = inspect.signature(cls.__init__).parameters
        # components present in the folder; absent required ones (safety checker, SD3's T5) are None
        required = [k for k, p in accepted.items()
                    if k != "self" and p.default is inspect.Parameter.empty and p.kind == p.POSITIONAL_OR_KEYWORD]
        kwargs = {k: parts.get(k) for k in accepted if k in parts or k in required}
        if "requires_safety_checker" in accepted:
            kwargs["requires_safety_checker"] = False
        pipe = cls(**kwargs)
    return prepare_pipeline(pipe, scheduler)


def prepare_pipeline(pipe: Any, scheduler: str = "") -> Any:
    """Swap in the diffusers scheduler class `scheduler` (built from the pipeline's scheduler
    config; "" keeps it) and silence the per-call progress bar (the caller shows one)."""
    import diffusers

    if scheduler:
        if not hasattr(diffusers, scheduler):
            raise ConfigError(f"scheduler: diffusers has no scheduler class '{scheduler}'")
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_size(pipe: Any) -> int:
    """The pipeline's default image side in pixels (what it uses when height/width are None)."""
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        size = pipe.unet.config.sample_size
    return int(size * pipe.vae_scale_factor)


def image_params(pipe: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters of `params` checked against the pipeline's `__call__` (an unknown
    key is a ConfigError naming it), completed with the defaults of RECORDED, so each manifest
    row holds what produced it."""
    signature = inspect.signature(pipe.__call__).parameters
    allowed = sorted(k for k in signature if k not in RESERVED and k != "kwargs")
    for key in params:
        if key not in allowed:
            raise ConfigError(f"unknown sampling parameter '{key}' for {type(pipe).__name__}; "
                              f"valid: {', '.join(allowed)}")
    out = dict(params)
    for key in RECORDED:
        if out.get(key) is None and key in signature:
            default = signature[key].default
            out[key] = default_size(pipe) if key in ("height", "width") and default is None else default
    return {k: v for k, v in out.items() if v is not inspect.Parameter.empty}


def edit_sources(items: list[dict[str, Any]], pipeline: str) -> list[list[str]] | None:
    """The source image paths of each item of an edit pipeline's batch (`source_image` -> [path],
    `source_images` -> its paths), or None when no item has one. An item without a source in a batch
    of edit prompts, or with several for a pipeline of one source per prompt (not in MULTI_SOURCE),
    is a DataError naming the sample and the pipeline."""
    from mmalign.errors import DataError

    found = [list(it.get("source_images", [it["source_image"]] if "source_image" in it else [])) for it in items]
    if not any(found):
        return None
    for item, sources in zip(items, found):
        if not sources:
            raise DataError(f"sample {item['id']}: no source image; every prompt of an edit batch needs "
                            "'source_image' or 'source_images'")
        if len(sources) > 1 and pipeline not in MULTI_SOURCE:
            raise DataError(f"sample {item['id']}: {len(sources)} source images; {pipeline} takes one per prompt "
                            f"(several per prompt: {', '.join(sorted(MULTI_SOURCE))})")
    return found


def generate_images(pipe: Any, prompts: list[str], seeds: list[int], params: dict[str, Any],
                    sources: list[list[str]] | None = None) -> list[Any]:
    """One PIL image per (prompt, seed), image i drawn with CPU generator seeded seeds[i].
    params: complete sampling parameters from `image_params` (negative_prompt: one string);
    sources: an edit model's source image paths per prompt (`edit_sources`), see `_generate_edits`."""
    if sources is not None:
        return _generate_edits(pipe, prompts, seeds, params, sources)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(params)
    if isinstance(kwargs.get("negative_prompt"), str):
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
    with torch.inference_mode():
        out = pipe(prompt=list(prompts), generator=generators, num_images_per_prompt=1, output_type="pil", **kwargs)
    return list(out.images)


def _generate_edits(pipe: Any, prompts: list[str], seeds: list[int], params: dict[str, Any],
                    sources: list[list[str]]) -> list[Any]:
    """`generate_images` of an edit pipeline. One source per prompt (QwenImageEditPipeline,
    FluxKontextPipeline): `image=` [source_i], one call per source size (a batch is sized by its first
    image). A MULTI_SOURCE pipeline reads `image=` [source_1, ..., source_K] as the K sources of ONE
    prompt and refuses batches: one call per sample, `prompt=[p_i]`, `generator=[seed_i]`."""
    from mmalign.data.media import load_image

    name = type(pipe).__name__
    if "image" not in inspect.signature(pipe.__call__).parameters:
        raise ConfigError(f"{name} takes no source image: prompts with 'source_image' need an edit "
                          "pipeline (QwenImageEditPipeline, FluxKontextPipeline, QwenImageEditPlusPipeline)")
    loaded = {path: load_image(path, f"source image {path}") for path in dict.fromkeys(p for s in sources for p in s)}
    if name in MULTI_SOURCE:
        return [generate_images(pipe, [prompt], [seed], dict(params, image=[loaded[p] for p in paths]))[0]
                for prompt, seed, paths in zip(prompts, seeds, sources, strict=True)]
    images = [loaded[paths[0]] for paths in sources]
    out: list[Any] = [None] * len(prompts)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.size, []).append(i)
    for rows in by_size.values():
        kwargs = dict(params, image=[images[i] for i in rows])
        made = generate_images(pipe, [prompts[i] for i in rows], [seeds[i] for i in rows], kwargs)
        for i, image in zip(rows, made):
            out[i] = image
    return out
