"""SmolVLM (`modality: smolvlm`): the Idefics3 architecture (`model.vision_model`, `model.connector`,
`model.text_model`) with SmolLM2 text and `SmolVLMProcessor` (which needs the `num2words` package);
placeholders and processor outputs as Idefics3.

LoRA targets are restricted to the language model: the vision-side submodules (vision_model,
connector) get no adapter. The processor's chat template, image placeholder and image-token
expansion are used as they are; prompts and image tokens are never cut
(mmalign/modalities/llava.py)."""

from __future__ import annotations

from mmalign.families._vlm import vlm_family

FAMILY = vlm_family("smolvlm",
                    "SmolVLM: answer-only token log-probs, LoRA on the language model",
                    model_types=("smolvlm",), vision_parts=("vision_model", "connector"))
