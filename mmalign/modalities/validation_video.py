"""Videos to watch during video diffusion training (`train.validate_every`, families whose
`Family.sample` is "videos": Wan).

`validate_videos` samples every prompt × seed of the config through the family's pipeline built
in memory from the policy transformer and the likelihood's frozen parts (`validation.sampling_pipeline`;
the sampler is a fresh copy of the training scheduler when it is a flow-sigmas UniPC, Wan's own),
`diffusion.num_frames` frames at `diffusion.resolution`, each video from its own CPU generator, and
writes per call:
- grid.mp4: one H.264 video whose frame k tiles frame k of every sample (rows: prompts, columns:
  seeds), at 16 fps (Wan's rate);
- grid.png: a contact sheet, one row per sample (prompt-major, then seed), up to 8 frames spread
  evenly over the clip (`data.video.frame_indices`) left to right;
- grid.json: the layout (prompts, seeds, frames shown, steps, guidance, resolution, num_frames).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmalign.io import atomic_path
from mmalign.nn import eval_mode

SHEET_FRAMES = 8
FPS = 16


def video_grid(videos: np.ndarray, columns: int) -> np.ndarray:
    """(n, F, H, W, 3) uint8 -> (F, rows·H, columns·W, 3): frame k tiles frame k of every video, row-major."""
    n, f, h, w, _ = videos.shape
    rows = -(-n // columns)
    grid = np.zeros((f, rows * h, columns * w, 3), dtype=np.uint8)
    for i, video in enumerate(videos):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = video
    return grid


def contact_sheet(videos: np.ndarray, frames: Sequence[int]) -> np.ndarray:
    """(n, F, H, W, 3) uint8 -> (n·H, len(frames)·W, 3): row i shows video i's `frames` left to right."""
    picked = videos[:, list(frames)]  # (n, k, H, W, 3)
    n, k, h, w, _ = picked.shape
    return picked.transpose(0, 2, 1, 3, 4).reshape(n * h, k * w, 3)


@torch.no_grad()
def sample_videos(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: dict[str, Any],
                  resolution: int, num_frames: int, width: int = 0,
                  images: Sequence[Any] | None = None) -> np.ndarray:
    """(len(prompts) · len(seeds), F, H, W, 3) uint8: for each prompt, one video per seed; H =
    resolution, W = width (0: square); `images`: each prompt's first frame (image-to-video pipelines)."""
    from mmalign.generate.video import to_uint8

    videos = []
    for i, prompt in enumerate(prompts):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        first = {} if images is None else {"image": images[i]}
        out = pipe(prompt=[prompt] * len(seeds), generator=generators, num_inference_steps=steps, **guidance,
                   height=resolution, width=width or resolution, num_frames=num_frames, output_type="np",
                   **first).frames
        videos.extend(to_uint8(v) for v in out)
    return np.stack(videos)


def validate_videos(likelihood: Any, model: torch.nn.Module, step: int, folder: str | Path,
                    prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                    images: Sequence[Any] | None = None, pipeline: str = "", layout: dict[str, Any] | None = None,
                    **extra: Any) -> dict[str, float]:
    """Sample prompts × seeds with the current `model` (eval mode, restored after) and write
    grid.mp4, grid.png and grid.json into `folder` (module docstring); image-to-video: `images` each
    prompt's first frame, `pipeline` the diffusers class and `extra` its parts (`sampling_pipeline`),
    `layout` more grid.json entries.

    Returns {"validation/videos": n, "validation/seconds": s} for the metrics log."""
    from mmalign.data.video import frame_indices, write_video
    from mmalign.modalities.validation import guidance_arguments, sampling_pipeline

    if not prompts or not seeds:
        raise ValueError("validation needs at least one prompt and one seed "
                         "(diffusion.validation_prompts, diffusion.validation_seeds)")
    tic = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = likelihood.settings
    with eval_mode(model):  # LoRA dropout off: the same seeds give the same videos
        videos = sample_videos(sampling_pipeline(likelihood, model, pipeline, **extra), prompts, seeds, steps,
                               guidance_arguments(likelihood.family, guidance), d.resolution, d.num_frames, d.width,
                               images)
    write_video(video_grid(videos, len(seeds)), folder / "grid.mp4", fps=FPS)
    shown = frame_indices(videos.shape[1], min(SHEET_FRAMES, videos.shape[1]))
    from PIL import Image

    with atomic_path(folder / "grid.png") as tmp:
        Image.fromarray(contact_sheet(videos, shown)).save(tmp, format="PNG")
    written = {"step": step, "rows": list(prompts), "columns": [int(s) for s in seeds], "steps": steps,
               "guidance": guidance, "resolution": d.resolution, "width": d.width or d.resolution,
               "num_frames": d.num_frames, "fps": FPS, "sheet_frames": shown, **(layout or {})}
    with atomic_path(folder / "grid.json") as tmp:
        tmp.write_text(json.dumps(written, indent=2))
    return {"validation/videos": float(videos.shape[0]), "validation/seconds": time.perf_counter() - tic}
