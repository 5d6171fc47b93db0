"""The shared descriptor of the transformers vision-language families (`AutoModelForImageTextToText`
+ `AutoProcessor`, answer-only token log-probs by `LlavaLikelihood`). What differs between them is
data, not code: the `model_type`s a family loads, and the names of its vision-side submodules (the
tower and the projector), which LoRA must leave alone. Chat template, image placeholder and the
expansion of image tokens come with the model's own processor.

Not a family itself (the leading underscore keeps it out of the registry)."""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

from mmalign.families import Family


def build(cfg: Any, use_cache: bool = True, trained: bool = True, *, parts: Sequence[str],
          model_types: Sequence[str]) -> tuple[Any, Any, Any]:
    """(model, likelihood, processor) from the local folder `model.path`."""
    from mmalign.modalities.llava import build as build_vlm

    return build_vlm(cfg, parts=parts, model_types=model_types)


def vlm_family(name: str, summary: str, model_types: Sequence[str], vision_parts: Sequence[str]) -> Family:
    """The `Family` of a transformers VLM: `model_types` its config.json may name, `vision_parts`
    the submodule names of its vision tower and projector (excluded from LoRA)."""
    return Family(name=name, summary=summary, kind="vlm",
                  build=partial(build, parts=tuple(vision_parts), model_types=tuple(model_types)),
                  export_formats=("merged", "lora"), sample="text")
