"""Reading media fields of preference records: a file path, raw bytes, a
{"bytes", "path"} dict (Hugging Face Image feature layout) or an already-open PIL image."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from mmalign.errors import DataError


def record_images(record: dict[str, Any]) -> list[Any]:
    """The image values of a record, as a list: its `images` field (a list, or one value), else
    its `image` field; [] when it has neither (or the field is None). Values are returned as
    stored (paths, bytes, {"bytes", "path"} dicts, PIL images); `load_image` reads one."""
    value = record.get("images", record.get("image"))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _resolve(path: Path, root: str | Path | Sequence[str | Path] | None) -> Path:
    """A relative path against the data folder that holds it (else the first folder). Held by
    two folders as different files (train and eval files in two folders, each with its own
    images/0.png), it is ambiguous: a `DataError`, never a silently wrong file."""
    if root is None or path.is_absolute():
        return path
    roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
    if not roots:
        return path
    found = [r / path for r in roots if (r / path).exists()]
    if len(found) > 1 and len({f.resolve() for f in found}) > 1:
        raise DataError(f"relative media path '{path}' names different files in the data folders "
                        f"{', '.join(str(f.parent) for f in found)}: keep the data files in one folder "
                        "or write absolute paths")
    return found[0] if found else roots[0] / path


def load_image(value: Any, where: str, root: str | Path | Sequence[str | Path] | None = None) -> Any:
    """An RGB `PIL.Image` from a record field; a missing or unreadable image raises a
    `DataError` naming `where` (e.g. "train.jsonl row 12, chosen"). Relative paths are
    resolved against `root`: the data file's folder, or several (train and eval folders),
    the first that holds the file winning."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            image = Image.open(_resolve(Path(value), root))
        else:
            raise DataError(f"{where}: expected an image path, bytes or {{'bytes','path'}}, got {type(value).__name__}")
        image.load()  # decode now, so a truncated file fails here and not mid-batch
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DataError(f"{where}: unreadable image ({e})") from e
    return image.convert("RGB")


def image_size(value: Any, where: str, root: str | Path | Sequence[str | Path] | None = None) -> tuple[int, int]:
    """(height, width) of an image value from its header only (no decoding), for cheap length
    estimates; an unreadable one raises a `DataError` naming `where`."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.height, value.width
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as image:
                return image.height, image.width
        if isinstance(value, str):
            with Image.open(_resolve(Path(value), root)) as image:
                return image.height, image.width
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DataError(f"{where}: unreadable image ({e})") from e
    raise DataError(f"{where}: expected an image path, bytes or {{'bytes','path'}}, got {type(value).__name__}")


def image_readable(value: Any) -> bool:
    """True when `load_image` would succeed (used to count and skip bad rows up front)."""
    try:
        load_image(value, "check")
        return True
    except DataError:
        return False


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def record_videos(record: dict[str, Any]) -> list[Any]:
    """The video values of a record: its `videos` field (a list), else its `video` field; []
    when it has neither. A video is a folder of frames, a list of frame values, or a file."""
    value = record.get("videos", record.get("video"))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) and not _is_frame_list(value) else [value]


def _is_frame_list(value: Any) -> bool:
    """`video: [frame, frame, ...]` (one video as frames) rather than `videos: [video, ...]`."""
    return bool(value) and all(isinstance(v, str) and Path(v).suffix.lower() in FRAME_SUFFIXES for v in value)


FRAMES_FPS = 2.0  # frame folders / lists without `video_fps`: Qwen's video sampling rate (qwen_vl_utils FPS)


def load_video_clip(value: Any, where: str, root: str | Path | Sequence[str | Path] | None = None,
                    fps: float | None = None) -> tuple[list[Any], float]:
    """(frames, frames per second): `load_video`'s frames and the rate they were taken at, which
    processors turn into temporal positions (Qwen2.5-VL `second_per_grid_ts` = temporal_patch / fps,
    Qwen3-VL timestamps). A file's rate is its container's; frames take `fps` (a record's
    `video_fps`), else FRAMES_FPS. Without it transformers assumes 24 fps."""
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0):
        raise DataError(f"{where}: video_fps must be a positive number, got {fps!r}")
    if isinstance(value, str) and _resolve(Path(value), root).is_file():
        frames, rate = _decode_file(_resolve(Path(value), root), where)
        return frames, float(fps or rate or FRAMES_FPS)
    return load_video(value, where, root), float(fps or FRAMES_FPS)


def load_video(value: Any, where: str, root: str | Path | Sequence[str | Path] | None = None) -> list[Any]:
    """One video as its frames, RGB `PIL.Image`s in time order: a folder of frame images
    (sorted by file name), a list of frame values (each as `load_image` reads it), or a video
    file decoded by transformers' `load_video` (torchcodec or PyAV, whichever is installed).
    Frames are returned as stored; the processor samples and resizes them per its settings. A
    missing folder, an empty one or an undecodable file is a `DataError` naming `where`."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where}: a video with no frames")
        return [load_image(v, f"{where}, frame {i}", root) for i, v in enumerate(value)]
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a frame folder, a list of frames or a video file, "
                        f"got {type(value).__name__}")
    path = _resolve(Path(value), root)
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise DataError(f"{where}: no frame images ({', '.join(FRAME_SUFFIXES)}) in the folder {path}")
        return [load_image(str(p), f"{where}, frame {p.name}") for p in frames]
    if not path.is_file():
        raise DataError(f"{where}: no such video file or frame folder: {path}")
    return _decode_file(path, where)[0]


def _decode_file(path: Path, where: str) -> tuple[list[Any], float | None]:
    """Every frame of a video file and its frame rate (None when the container has none), by
    torchcodec when installed, else PyAV."""
    import importlib.util

    from PIL import Image
    from transformers.video_utils import load_video as hf_load_video

    backend = "torchcodec" if importlib.util.find_spec("torchcodec") else "pyav"
    try:
        frames, metadata = hf_load_video(str(path), backend=backend)
    except ImportError as e:
        raise DataError(f"{where}: decoding the video file {path} needs torchcodec or PyAV ({e}); "
                        "install one, or give a folder of frames") from e
    except Exception as e:  # the backends raise their own error types for a corrupt file
        raise DataError(f"{where}: undecodable video file {path} ({type(e).__name__}: {e})") from e
    return [Image.fromarray(f).convert("RGB") for f in frames], (metadata.fps if metadata is not None else None)
