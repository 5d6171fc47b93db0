"""Videos from diffusers text-to-video pipelines (WanPipeline) in a local folder, for `mmalign generate`.

A folder is a video pipeline when its pipeline class is a family's whose `Family.sample` is
"videos" (`is_video_pipeline`). Each video gets its own CPU `torch.Generator` seeded with its
sample seed (the pipeline draws each video's initial latents from it): WanPipeline pads every
prompt to the same 512 tokens with zeros and runs the transformer unmasked, so a video depends on
its prompt, seed and parameters only, not on the other prompts of its batch. Videos are written
as H.264 mp4 (yuv420p, crf 18) at `fps` frames per second (a `--set fps=N` sampling parameter,
default 16, Wan's rate; recorded in the manifest with the pipeline's own parameters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmalign.errors import ConfigError
from mmalign.generate.images import RESERVED, image_params, load_pipeline, pipeline_class_name
from mmalign.generate.manifest import media_rows

VIDEO_RESERVED = RESERVED | {"num_videos_per_prompt"}
DEFAULT_FPS = 16  # Wan 2.1 writes its 81-frame videos at 16 fps (WanPipeline's example)


def is_video_pipeline(path: str | Path) -> bool:
    """The folder's pipeline class belongs to a family that samples videos."""
    from mmalign.families import family_for_pipeline

    family = family_for_pipeline(pipeline_class_name(path))
    return family is not None and family.sample == "videos"


def video_params(pipe: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters checked against the pipeline's `__call__` (as `image_params`), with
    num_frames recorded at the pipeline's default when not set."""
    import inspect

    for key in params:
        if key in VIDEO_RESERVED:
            raise ConfigError(f"sampling parameter '{key}' is set by mmalign generate (one video per seed)")
    out = image_params(pipe, params)
    signature = inspect.signature(pipe.__call__).parameters
    if "num_frames" in signature and out.get("num_frames") is None:
        out["num_frames"] = signature["num_frames"].default
    return out


def to_uint8(video: np.ndarray) -> np.ndarray:
    """A pipeline's np video (F, H, W, 3) in [0, 1] -> uint8 (F, H, W, 3), rounded."""
    return (np.clip(np.asarray(video, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def generate_videos(pipe: Any, prompts: list[str], seeds: list[int], params: dict[str, Any]) -> list[np.ndarray]:
    """One uint8 video (F, H, W, 3) per (prompt, seed), video i from a CPU generator seeded seeds[i]."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(params)
    if isinstance(kwargs.get("negative_prompt"), str):
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
    with torch.inference_mode():
        out = pipe(prompt=list(prompts), generator=generators, num_videos_per_prompt=1, output_type="np", **kwargs)
    return [to_uint8(video) for video in out.frames]


def video_generator(opts: Any, path: Path, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    """(items -> rows with their mp4 written, sampling params) for `mmalign generate` (run.py)."""
    from mmalign.data.video import write_video

    sampling = dict(opts.sampling)
    scheduler = sampling.pop("scheduler", "")
    fps = sampling.pop("fps", DEFAULT_FPS)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
        raise ConfigError(f"sampling.fps: expected a positive integer, got {fps!r}")
    pipe = load_pipeline(path, getattr(torch, opts.dtype), scheduler).to(device)
    params = video_params(pipe, sampling)
    call = dict(params)
    params = {**params, "fps": fps, **({"scheduler": scheduler} if scheduler else {})}
    out = Path(opts.out)

    def run(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        videos = generate_videos(pipe, [it["prompt"] for it in items], [it["seed"] for it in items], call)
        return media_rows(items, videos, out, "video", ".mp4",
                          lambda video, tmp: write_video(video, tmp, fps=fps, container="mp4"))

    return run, params
