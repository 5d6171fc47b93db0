"""Validation videos of Wan image-to-video (`train.validate_every` with a WanImageToVideoPipeline folder):
a video needs a first frame, so, as the edit families' grids (edit_validation.py), the grid's rows are the
first N training records (N = the number of `diffusion.validation_prompts`), each its prompt continuing its
own `source_image`, and its columns the `diffusion.validation_seeds`.

Each row is one call of WanImageToVideoPipeline built in memory from the policy transformer (both experts
of Wan 2.2 A14B) and the likelihood's frozen parts (`validation.sampling_pipeline`, plus the CLIP image
encoder and processor of Wan 2.1), with image = the record's source image as read for training, prompt =
its prompt, height = width = resolution, num_frames, guidance_scale as the other video runs and one CPU
generator per seed: the same weights give the same videos. The files are T2V's (validation_video.py):
grid.mp4 (frame k tiles frame k of every video), grid.png (each video's frames left to right) and
grid.json (with each row's source).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from mmalign.families._wan_i2v import SOURCE
from mmalign.modalities.text import _prompt_text


def validate_i2v(likelihood: Any, model: torch.nn.Module, step: int, folder: str | Path, seeds: Sequence[int],
                 steps: int, guidance: float) -> dict[str, float]:
    """Videos of the validation records (`WanI2VConditioning.validation`) × seeds with the current `model`
    (module docstring). Returns {"validation/videos": n, "validation/seconds": s}."""
    from mmalign.modalities.validation_video import validate_videos

    conditioning = likelihood.conditioning
    records = conditioning.validation
    if not records or not seeds:
        raise ValueError("image-to-video validation needs at least one training record and one seed "
                         "(diffusion.validation_prompts, diffusion.validation_seeds)")
    image = conditioning.image
    sources = [image.source(r, f"validation record {r.get('_index', i)}, {SOURCE}") for i, r in enumerate(records)]
    return validate_videos(likelihood, model, step, folder, [_prompt_text(r["prompt"]) for r in records], seeds,
                           steps, guidance, images=sources, pipeline="WanImageToVideoPipeline",
                           layout={"sources": [str(r[SOURCE]) for r in records]},
                           image_encoder=image.image_encoder, image_processor=image.image_processor)
