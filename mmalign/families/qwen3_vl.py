"""Qwen3-VL (`modality: qwen3_vl`): ViT with learned position embeddings and DeepStack mergers
(`model.visual`, patch 16, 2x2 merge) feeding Qwen3 with interleaved M-RoPE; placeholders and
processor outputs as Qwen2.5-VL (`<|vision_start|><|image_pad|><|vision_end|>`, `image_grid_thw`).

LoRA targets are restricted to the language model: the vision-side submodules (visual, including the
DeepStack mergers) get no adapter. The processor's chat template, image placeholder and image-token
expansion are used as they are; prompts and image tokens are never cut
(mmalign/modalities/llava.py)."""

from __future__ import annotations

from mmalign.families._vlm import vlm_family

FAMILY = vlm_family("qwen3_vl",
                    "Qwen3-VL: answer-only token log-probs, LoRA on the language model",
                    model_types=("qwen3_vl",), vision_parts=("visual",))
