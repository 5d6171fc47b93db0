"""Reading and writing the videos of video preference records (`modality: wan`), with PyAV.

A video field of a record {"prompt", "chosen", "rejected"} is one of:
- a video file path (mp4, webm, mkv, mov, avi, gif: whatever PyAV's FFmpeg decodes), relative to
  the data file's folder or absolute;
- a folder of frame images (png, jpg, jpeg, webp, bmp), read in natural name order
  (frame_2.png before frame_10.png);
- raw bytes of a video file, or {"bytes", "path"} (the Hugging Face layout).

Frame sampling: a clip of T decoded frames gives `num_frames` frames at the indices
round(linspace(0, T - 1, num_frames)) (the whole clip, evenly; all frames when T == num_frames).
A clip shorter than num_frames is a `DataError` (repeating frames would fake a slower motion).
Every failure (missing file, undecodable stream, no frames, an unreadable frame image) is one
`DataError` line naming the record's row and field.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmalign.data.media import _resolve
from mmalign.errors import DataError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def frame_indices(total: int, num_frames: int) -> list[int]:
    """round(linspace(0, total - 1, num_frames)) as ints: e.g. (9, 5) -> [0, 2, 4, 6, 8];
    (10, 4) -> [0, 3, 6, 9]. Requires total >= num_frames >= 1."""
    return [int(i) for i in np.round(np.linspace(0, total - 1, num_frames)).astype(int)]


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _folder_frames(folder: Path) -> list[Path]:
    """The frame image files of a frame folder, in natural name order (opened when picked)."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)


def _decoded_frames(source: Any, where: str) -> list[Any]:
    """The decoded frames (av.VideoFrame, in the stream's own pixel format, converted to RGB only
    when picked) of the first video stream of a file path or a file-like object."""
    import av

    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise DataError(f"{where}: no video stream in {source if isinstance(source, str) else 'the bytes'}")
            return list(container.decode(container.streams.video[0]))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{where}: unreadable video ({e})") from e


def _frame_sources(value: Any, where: str, root: str | Path | Sequence[str | Path] | None) -> list[Any]:
    """Every frame of a record's video field, not yet converted: decoded av frames of a video
    file or bytes, or the image files of a frame folder (module docstring for the forms)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        frames = _decoded_frames(io.BytesIO(value), where)
    elif isinstance(value, str) and value:
        path = _resolve(Path(value), root)
        if path.is_dir():
            frames = _folder_frames(path)
        elif path.is_file():
            frames = _decoded_frames(str(path), where)
        else:
            raise DataError(f"{where}: video {path} does not exist")
    else:
        raise DataError(f"{where}: expected a video path, a frame folder or bytes, got {type(value).__name__}")
    if not frames:
        raise DataError(f"{where}: the video has no frames")
    return frames


def _rgb(frame: Any, where: str) -> Any:
    """An RGB PIL image of a decoded av frame or of a frame image file."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(frame, Path):
        return frame.to_image()
    try:
        with Image.open(frame) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{where}: unreadable frame {frame} ({e})") from e


def load_video(value: Any, where: str, root: str | Path | Sequence[str | Path] | None = None,
               num_frames: int = 0) -> list[Any]:
    """`num_frames` RGB PIL frames of a record's video sampled evenly over the clip
    (`frame_indices`; 0 = every frame); relative paths resolved against `root` as images are
    (`media._resolve`). Fewer frames than num_frames, or picked frames of different sizes, are a
    `DataError`. Only the picked frames are converted to RGB (frame folders: only they are read)."""
    frames = _frame_sources(value, where, root)
    if num_frames and len(frames) < num_frames:
        raise DataError(f"{where}: the video has {len(frames)} frames, fewer than diffusion.num_frames "
                        f"{num_frames}")
    picked = frames if not num_frames else [frames[i] for i in frame_indices(len(frames), num_frames)]
    images = [_rgb(frame, where) for frame in picked]
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise DataError(f"{where}: the frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})")
    return images


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16, codec: str = "libx264", crf: int = 18,
                container: str = "") -> Path:
    """Write uint8 frames (F, H, W, 3) as a video file (mp4 with H.264 yuv420p by default; webm
    with codec "libvpx-vp9"), atomically (a temporary name in the same folder, then renamed).
    container: FFmpeg's format name ("" = from the suffix: mp4, webm, matroska, mov). H.264 needs
    even sides: odd ones are a ValueError."""
    import av

    from mmalign.io import atomic_path

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    f, h, w, _ = frames.shape
    if codec == "libx264" and (h % 2 or w % 2):
        raise ValueError(f"write_video: H.264 needs even frame sides, got {w}x{h}")
    path = Path(path)
    with atomic_path(path) as tmp:
        fmt = container or {".mp4": "mp4", ".webm": "webm", ".mkv": "matroska", ".mov": "mov"}.get(path.suffix.lower())
        with av.open(str(tmp), mode="w", format=fmt) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)}
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path
