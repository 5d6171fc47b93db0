"""Qwen2.5-VL (`modality: qwen2_5_vl`): dynamic-resolution ViT (`model.visual`: patch 14, 2x2 merger,
window attention) feeding Qwen2.5 with M-RoPE; one `<|vision_start|><|image_pad|><|vision_end|>` per
image, expanded by the processor to (grid_t * grid_h * grid_w) / 4 `<|image_pad|>` tokens;
`pixel_values` (Σ patches, C*T*P*P) and `image_grid_thw` (images, 3) per image, `mm_token_type_ids`
per token (the model's 3-D rope positions).

LoRA targets are restricted to the language model: the vision-side submodules (visual) get no
adapter. The processor's chat template, image placeholder and image-token expansion are used as they
are; prompts and image tokens are never cut (mmalign/modalities/llava.py)."""

from __future__ import annotations

from mmalign.families._vlm import vlm_family

FAMILY = vlm_family("qwen2_5_vl",
                    "Qwen2.5-VL: answer-only token log-probs, LoRA on the language model",
                    model_types=("qwen2_5_vl",), vision_parts=("visual",))
