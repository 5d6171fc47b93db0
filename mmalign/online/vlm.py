"""Online rounds of VLMs (`Family.kind == "vlm"`, `Family.sample == "text"`; iterative online DPO
for hallucination, METHODS.md D.2 RLAIF-V, D.3 OPA-DPO, §4).

Prompts (`online.prompts`, jsonl / json / parquet): one record per (image, instruction),

    {"image": "images/0001.png", "prompt": "describe the image .", "objects": ["circle", ...]}

`image` (or `images`, a list) is a path relative to the prompt file; `objects` (optional) are the
image's annotation objects, category names or annotation dicts naming it under "category",
"name" or "shape" (the toy world's `write_world` rows). Every sample row of the round carries the
prompt's `images` (absolute paths) and `objects`, so a scorer can see them: the annotation
scorer (`annotations=VOCAB`) counts hallucinated objects, the claim judge (`claims=VLM`) looks at
the image.

Sampling: `generate_answers` (what `mmalign generate` and `build-pairs onpolicy` run for VLM
answers) with answer i drawn by its own generator seeded `job.seeds[i]`; the prompt is formatted
as training formats it (the processor's chat template unless `online.sampling.chat_template`).
Output rows: {"kind": "text", "text"}; the chosen/rejected records keep the prompt's images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.errors import ConfigError, DataError

OBJECT_KEYS = ("category", "name", "shape")  # where an annotation dict names its object


def object_name(value: Any, where: str) -> str:
    """An annotation object as its category name: a string, or a dict's first of OBJECT_KEYS."""
    if isinstance(value, str) and value.strip():
        return value.strip().lower()
    if isinstance(value, dict):
        for key in OBJECT_KEYS:
            if isinstance(value.get(key), str) and value[key].strip():
                return value[key].strip().lower()
    raise DataError(f"{where}: an object must be a name or a dict with one of {', '.join(OBJECT_KEYS)}, "
                    f"got {value!r}")


def vlm_prompt(record: dict[str, Any], root: Path, where: str) -> tuple[str, dict[str, Any]]:
    """(prompt text, per-prompt fields {"images": [absolute paths], "objects"?: [names]}) of one
    prompt record; a missing prompt, image or image file is a DataError naming `where`."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: no 'prompt' (the instruction asked about the image)")
    images = record.get("images", [record["image"]] if "image" in record else [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise DataError(f"{where}: no 'image' (a path relative to the prompt file, or 'images': [paths])")
    paths = [p if Path(p).is_absolute() else str((root / p).resolve()) for p in images]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{where}: image not found: {missing[0]}")
    fields: dict[str, Any] = {"images": paths}
    if "objects" in record:
        if not isinstance(record["objects"], list):
            raise DataError(f"{where}: 'objects' must be a list, got {type(record['objects']).__name__}")
        fields["objects"] = sorted({object_name(o, f"{where}, objects[{i}]") for i, o in enumerate(record["objects"])})
    return prompt, fields


def load_vlm_prompts(settings: Any, keys: tuple[str, str] = ("online.prompts", "online.prompt_list")
                     ) -> tuple[list[str], list[dict[str, Any]]]:
    """(prompts, per-prompt fields) of the prompt file `settings.prompts` (see the module docstring);
    `keys`: the config keys of the file and of the list that errors name (the held-out guard's
    are online.eval_prompts, online.eval_prompt_list)."""
    from mmalign.data.preference import read_records

    file_key, list_key = keys
    if settings.prompt_list:
        raise ConfigError(f"{list_key} has no images: a VLM's online prompts come from {file_key} "
                          "(records with 'image' and 'prompt')")
    from mmalign.data.hub_data import local_data_path

    path = Path(local_data_path(settings.prompts)) if settings.prompts else Path()
    if not settings.prompts or not path.is_file():
        raise ConfigError(f"{file_key}: prompt file not found: '{settings.prompts}'")
    if path.suffix == ".txt":
        raise ConfigError(f"{file_key}: {path} is a text file; a VLM needs records with 'image' and 'prompt'")
    rows = read_records(path)
    if not rows:
        raise DataError(f"{path}: no prompts")
    pairs = [vlm_prompt(r, path.parent, f"{path}: row {i}") for i, r in enumerate(rows)]
    return [p for p, _ in pairs], [f for _, f in pairs]


def vlm_params(ctx: Any) -> dict[str, Any]:
    """`online.sampling` as `generate_answers` keywords; the prompt template follows training
    (`data.chat_template` on: required; off: the processor's template when it has one)."""
    from mmalign.online.samplers import text_params

    params = text_params(ctx)
    if "chat_template" not in ctx.sampling:
        params["chat_template"] = True if ctx.chat_template else None
    return params


def sample_vlm(ctx: Any, model: torch.nn.Module, job: Any) -> list[dict[str, Any]]:
    """N answers of a VLM, answer i about job.fields[i]["images"] drawn with its own generator
    seeded job.seeds[i] (`generate_answers`)."""
    from mmalign.generate.text import generate_answers

    if len(job.fields) != len(job.prompts) or any("images" not in f for f in job.fields):
        raise DataError("online VLM round: every sample needs its prompt's images (online.prompts records)")
    records = [{"prompt": p, "images": list(f["images"])} for p, f in zip(job.prompts, job.fields)]
    answers = generate_answers(model, ctx.processor, records, seeds=job.seeds, batch_size=ctx.batch_size,
                               **vlm_params(ctx))
    return [{"kind": "text", "text": a} for a in answers]
