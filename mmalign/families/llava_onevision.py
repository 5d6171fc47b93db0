"""LLaVA-OneVision (`modality: llava_onevision`): SigLIP tower (`model.vision_tower`), MLP projector
(`model.multi_modal_projector`) and a learned `image_newline` feeding Qwen2; the template writes
`<image>` per image, expanded by the processor to the anyres-max-9 count (base tile + unpadded grid
tiles + one newline per row); `pixel_values` (images, tiles, 3, H, W), `image_sizes` and
`batch_num_images` per image.

LoRA targets are restricted to the language model: the vision-side submodules (vision_tower,
multi_modal_projector, image_newline) get no adapter. The processor's chat template, image
placeholder and image-token expansion are used as they are; prompts and image tokens are never cut
(mmalign/modalities/llava.py)."""

from __future__ import annotations

from mmalign.families._vlm import vlm_family

FAMILY = vlm_family("llava_onevision",
                    "LLaVA-OneVision: answer-only token log-probs, LoRA on the language model",
                    model_types=("llava_onevision",),
                    vision_parts=("vision_tower", "multi_modal_projector", "image_newline"))
