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


def image_readable(value: Any) -> bool:
    """True when `load_image` would succeed (used to count and skip bad rows up front)."""
    try:
        load_image(value, "check")
        return True
    except DataError:
        return False
