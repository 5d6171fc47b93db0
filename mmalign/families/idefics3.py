"""Idefics3 (`modality: idefics3`): SigLIP tower (`model.vision_model`) and a pixel-shuffle connector
(`model.connector`) feeding Llama 3 (`model.text_model`); the template writes `<image>` per image,
which the processor expands to `<fake_token_around_image><global-img>` + image_seq_len `<image>` +
`<fake_token_around_image>` (with row/column tiles when splitting); `pixel_values` (1, images, 3, H,
W) and `pixel_attention_mask` per record (zero-padded images are dropped by the model).

LoRA targets are restricted to the language model: the vision-side submodules (vision_model,
connector) get no adapter. The processor's chat template, image placeholder and image-token
expansion are used as they are; prompts and image tokens are never cut
(mmalign/modalities/llava.py)."""

from __future__ import annotations

from mmalign.families._vlm import vlm_family

FAMILY = vlm_family("idefics3",
                    "Idefics3: answer-only token log-probs, LoRA on the language model",
                    model_types=("idefics3",), vision_parts=("vision_model", "connector"))
