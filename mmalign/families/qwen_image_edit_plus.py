"""Qwen-Image-Edit-Plus (Qwen-Image-Edit-2509; `modality: qwen_image_edit_plus`): multi-source edit pairs
{source_images: [image, ...], prompt, chosen, rejected} (or one `source_image`), as diffusers'
QwenImageEditPlusPipeline (pipelines/qwenimage/pipeline_qwenimage_edit_plus.py, diffusers 0.42.1)
feeds its sources; the rest is Qwen-Image-Edit's (families/qwen_image_edit.py):

- each source k is sized twice from its own aspect ratio r_k: for the VL text encoder to
  calculate_dimensions(A_c, r_k) (`image_processor.resize`) and for the VAE to calculate_dimensions(A, r_k)
  (`image_processor.preprocess` of the original), with A = resolution² and A_c = A · 384² / 1024²
  (the pipeline's CONDITION_IMAGE_SIZE 384² and VAE_IMAGE_SIZE 1024² at resolution 1024);
- the instruction is preceded by "Picture k: <|vision_start|><|image_pad|><|vision_end|>" for each
  source, in the Plus template (no vision tokens of its own), 64 tokens dropped;
- every source's packed latents follow the noisy target on the sequence, in order, and img_shapes
  lists the target's grid then each source's: [[(1, h/2, w/2), (1, h_1/2, w_1/2), ...]].

The pipeline samples one prompt at a time (it refuses batches); the likelihood batches pairs whose
sources have the same grids (one transformer call per grid combination, `rows_by_shape`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mmalign.families import Family
from mmalign.families.qwen_image import LAYOUT, TEXT_ENCODERS
from mmalign.families.qwen_image_edit import QwenEditText, build_qwen_edit, source_size

# QwenImageEditPlusPipeline.__init__ / _get_qwen_prompt_embeds: the template and each image's prefix
TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
            "background), then explain how the user's text instruction should alter or modify the image. Generate a "
            "new image that meets the user's requirements while maintaining consistency with the original input where "
            "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
CONDITION_AREA, VAE_AREA = 384 * 384, 1024 * 1024  # the pipeline's CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE


class QwenEditPlusText(QwenEditText):
    """Qwen-Image-Edit's conditioning with the Plus template, "Picture k" prefixes and two sizes per source."""

    max_sources = 1 << 16  # the pipeline takes any number of sources

    def prepare(self, image: Any) -> tuple[Any, Tensor]:
        """(the VL image: resized to the condition area, the VAE pixels (3, h, w) at the area)."""
        ratio = image.width / image.height
        cond_w, cond_h = source_size(round(self.area * CONDITION_AREA / VAE_AREA), ratio)
        vae_w, vae_h = source_size(self.area, ratio)
        return (self.image_processor.resize(image, cond_h, cond_w),
                self.image_processor.preprocess(image, vae_h, vae_w)[0])

    def pipeline_inputs(self, images: list[Any]) -> dict[str, Any]:
        """{"image": every source, in order}."""
        return {"image": list(images)}

    def texts(self, prompts: list[str], images: list[list[Any]]) -> list[str]:
        """The Plus template around "Picture 1: ...Picture K: " + the instruction."""
        return [TEMPLATE.format("".join(PICTURE.format(k + 1) for k in range(len(item))) + p)
                for p, item in zip(prompts, images)]


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable QwenImageTransformer2DModel, multi-source edit likelihood, None)."""
    return build_qwen_edit(cfg, FAMILY, QwenEditPlusText, trained, use_cache)


FAMILY = Family(
    name="qwen_image_edit_plus",
    summary="Qwen-Image-Edit-2509 (Plus): several source images, each read by Qwen2.5-VL and packed on the sequence",
    kind="image", build=build, trained="transformer", layout=LAYOUT, text_encoders=TEXT_ENCODERS,
    pipeline="QwenImageEditPlusPipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images", zeros_null_prompt=False, true_cfg=True)
