"""Gemma 3 (`modality: gemma3`): SigLIP tower (`model.vision_tower`) and an average-pool projector
(`model.multi_modal_projector`, 256 soft tokens per 896 px image) feeding Gemma 3; the chat template
writes `<start_of_image>` per image, which the processor expands to `<start_of_image>` + 256
`<image_soft_token>` + `<end_of_image>`; `token_type_ids` per token mark the image tokens
(bidirectional attention over each image).

LoRA targets are restricted to the language model: the vision-side submodules (vision_tower,
multi_modal_projector) get no adapter. The processor's chat template, image placeholder and image-
token expansion are used as they are; prompts and image tokens are never cut
(mmalign/modalities/llava.py)."""

from __future__ import annotations

from mmalign.families._vlm import vlm_family

FAMILY = vlm_family("gemma3",
                    "Gemma 3: answer-only token log-probs, LoRA on the language model",
                    model_types=("gemma3",), vision_parts=("vision_tower", "multi_modal_projector"))
