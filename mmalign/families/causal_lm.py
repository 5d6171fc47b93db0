"""Causal language models (`modality: causal_lm`; Llama, Qwen, Mistral, ... through
`AutoModelForCausalLM`): answer-only token log-probs (`CausalLMLikelihood`,
mmalign/modalities/causal_lm.py). Trained whole (or with LoRA); exported with `save_pretrained`
(merged model or adapter folder, with the tokenizer)."""

from __future__ import annotations

from typing import Any

from mmalign.families import Family


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, Any]:
    """(model, likelihood, tokenizer) from the local folder `model.path` (no cache exists)."""
    from mmalign.modalities.causal_lm import build as build_lm

    return build_lm(cfg)


FAMILY = Family(name="causal_lm", summary="causal LMs (AutoModelForCausalLM): answer-only token log-probs",
                kind="text", build=build, export_formats=("merged", "lora"), sample="text")
