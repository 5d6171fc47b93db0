"""Vision-language models with `AutoModelForImageTextToText` (`modality: llava`; LLaVA-1.5,
LLaVA-NeXT, ...): answer-only token log-probs with the images in the prompt (`LlavaLikelihood`,
mmalign/modalities/llava.py); LoRA restricted to the language model. Exported with
`save_pretrained` (merged model or adapter folder, with the processor)."""

from __future__ import annotations

from typing import Any

from mmalign.families import Family


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, Any]:
    """(model, likelihood, processor) from the local folder `model.path`."""
    from mmalign.modalities.llava import build as build_vlm

    return build_vlm(cfg)


FAMILY = Family(name="llava", summary="LLaVA-family VLMs (LLaVA-1.5, NeXT, ...): answer-only token log-probs",
                kind="vlm", build=build, export_formats=("merged", "lora"), sample="text")
