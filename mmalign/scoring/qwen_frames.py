"""Video frames as the Qwen-VL reward models read them (qwen-vl-utils' `fetch_video`, which
VideoAlign's `vision_process.py` and UnifiedReward's inference scripts use).

Frame count (`smart_nframes`), with the clip's T decoded frames at `video_fps`:

    n = round2(frames)                                       when `frames` is given, else
    n = round2(clamp(T / video_fps * fps, ceil2(min_frames), floor2(min(max_frames, T))))
    n = min(n, T);   indices = round(linspace(0, T - 1, n))   ("uniform" sampling)

with round2 / ceil2 / floor2 rounding to a multiple of 2 (Qwen's temporal patch). Frame size
(`smart_resize`): both sides multiples of `factor` (patch * merge, 28 for Qwen2-VL), the area
within [min_pixels, max_pixels], the aspect ratio kept; frames are resized with bicubic
interpolation and antialiasing on uint8 (torchvision), as `fetch_video` does. Videos are
decoded with PyAV (its average frame rate is `video_fps`); a frame folder has no frame rate, so
it needs `frames`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError, DataError

FRAME_FACTOR = 2
MAX_RATIO = 200
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28


def _round(x: float, f: int) -> int:
    return round(x / f) * f


def smart_nframes(total: int, video_fps: float | None, fps: float = 2.0, frames: int | None = None,
                  min_frames: int = 4, max_frames: int = 768) -> int:
    """How many frames of a T-frame clip the model sees (module docstring); >= 2."""
    if frames is not None:
        n = _round(frames, FRAME_FACTOR)
    else:
        if not video_fps:
            raise DataError("the video has no frame rate (a frame folder): give frames=N")
        low = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(max_frames, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = _round(min(max(total / video_fps * fps, low), high), FRAME_FACTOR)
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise DataError(f"the video has {total} frames; the model needs at least {FRAME_FACTOR}")
    return n


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w): multiples of `factor`, h*w within [min_pixels, max_pixels], aspect ratio kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise DataError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_RATIO}")
    h, w = max(factor, _round(height, factor)), max(factor, _round(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def decode(video: Any, where: str) -> tuple[list[Any], float | None]:
    """(RGB PIL frames, frame rate or None) of a video file (PyAV) or a frame folder / list."""
    from pathlib import Path

    from mmalign.data.video import load_video

    if isinstance(video, (str, Path)) and Path(video).is_file():
        import av

        try:
            with av.open(str(video)) as container:
                if not container.streams.video:
                    raise DataError(f"{where}: no video stream in {video}")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                frames = [f.to_image() for f in container.decode(stream)]
        except (av.error.FFmpegError, OSError) as e:
            raise DataError(f"{where}: unreadable video ({e})") from e
        if not frames:
            raise DataError(f"{where}: the video has no frames")
        return frames, float(rate) if rate else None
    if isinstance(video, (list, tuple)):
        return list(video), None
    return load_video(str(video), where), None


def sample_frames(video: Any, where: str, *, factor: int, fps: float = 2.0, frames: int | None = None,
                  min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int | None = None,
                  total_pixels: int = VIDEO_TOTAL_PIXELS) -> tuple[Tensor, float]:
    """((n, 3, h, w) uint8 frames the model sees, their frame rate n / T * video_fps) (module
    docstring; the rate is `fps` for a frame folder). max_pixels None: qwen-vl-utils' default
    max(min(VIDEO_MAX_PIXELS, total_pixels / n * 2), 1.05 * min_pixels)."""
    import numpy as np
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    every, rate = decode(video, where)
    try:
        n = smart_nframes(len(every), rate, fps, frames)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    index = torch.linspace(0, len(every) - 1, n).round().long().tolist()
    clip = torch.from_numpy(np.stack([np.asarray(every[i].convert("RGB")) for i in index])).permute(0, 3, 1, 2)
    if max_pixels is None:
        max_pixels = int(max(min(VIDEO_MAX_PIXELS, total_pixels / n * FRAME_FACTOR), int(min_pixels * 1.05)))
    h, w = smart_resize(clip.shape[2], clip.shape[3], factor, min_pixels, max_pixels)
    sampled_fps = n / len(every) * rate if rate else fps
    return resize(clip, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True), sampled_fps


def video_factor(processor: Any) -> int:
    """patch_size * merge_size of a Qwen-VL processor's video processor (28 for Qwen2-VL)."""
    video = getattr(processor, "video_processor", None)
    if video is None:
        raise ConfigError("the reward model's processor has no video processor (not a Qwen-VL processor)")
    return int(video.patch_size) * int(video.merge_size)
