"""The generic on-disk format for image preference pairs (what the pair builders write).

    out_dir/<name>.jsonl      one pair per line: {"prompt", "chosen", "rejected", ...provenance}
    out_dir/images/<name>-<row>-chosen.png (or .jpg, as given)

`chosen` / `rejected` are paths RELATIVE to out_dir, so the folder can be moved. Read it back
with the generic loader, `load_preference_data(out_dir / "<name>.jsonl")`, and open images
with `load_image(record["chosen"], where, root=out_dir)`. `write_image_pairs_parquet` writes
one self-contained parquet file instead (image bytes inline). See datasets/image_pairs/README.md.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmalign.errors import DataError
from mmalign.io import atomic_path

IMAGE_KEYS = ("chosen", "rejected")
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def _atomic_write(target: Path, write: Any) -> None:
    """Call `write(tmp_path)`, then rename onto `target`; no temp file survives an error."""
    with atomic_path(target) as tmp:
        write(tmp)


def image_bytes(value: Any, where: str, image_format: str = "PNG") -> tuple[bytes, str]:
    """(encoded bytes, file suffix) of a PIL image (encoded as `image_format`), raw bytes
    (kept verbatim), a path (file copied verbatim) or a {"bytes", "path"} dict."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        buf, fmt = io.BytesIO(), image_format.upper().replace("JPG", "JPEG")
        (value.convert("RGB") if fmt == "JPEG" else value).save(buf, format=fmt)
        return buf.getvalue(), _SUFFIX.get(fmt, "." + fmt.lower())
    if isinstance(value, (str, Path)):
        try:
            data = Path(value).read_bytes()
        except OSError as e:
            raise DataError(f"{where}: cannot read image file {value} ({e})") from e
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise DataError(f"{where}: expected a PIL image, image bytes or a path, got {type(value).__name__}")
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{where}: not an image ({e})") from e
    return data, _SUFFIX.get(fmt or "", ".img")


def _jsonable(value: Any) -> Any:
    """Provenance values as JSON: numpy / torch scalars and arrays become numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def write_image_pairs(records: Iterable[dict[str, Any]], out_dir: str | Path, name: str = "pairs",
                      image_format: str = "PNG") -> Path:
    """Write pairs (`prompt`, `chosen`, `rejected` + any provenance: scores, seeds, model...)
    as image files plus `out_dir/<name>.jsonl`. Every file goes through a temp file and a
    rename, and the jsonl is written last, so a reader never sees a partial dataset and a
    failed run leaves an earlier `<name>.jsonl` as it was. Returns the jsonl path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(records):
        missing = [k for k in ("prompt", *IMAGE_KEYS) if k not in record]
        if missing:
            raise DataError(f"pair {i} has no {', '.join(missing)}")
        row = {k: _jsonable(v) for k, v in record.items()}
        for key in IMAGE_KEYS:
            data, suffix = image_bytes(record[key], f"pair {i}, {key}", image_format)
            relative = Path("images") / f"{name}-{i:06d}-{key}{suffix}"
            _atomic_write(out_dir / relative, lambda tmp, data=data: tmp.write_bytes(data))
            row[key] = relative.as_posix()
        try:
            lines.append(json.dumps(row, ensure_ascii=False))
        except TypeError as e:
            raise DataError(f"pair {i}: a provenance field is not JSON-serialisable ({e})") from e
    if not lines:
        raise DataError("write_image_pairs: no records")
    target = out_dir / f"{name}.jsonl"
    _atomic_write(target, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))
    return target


def write_image_pairs_parquet(records: Iterable[dict[str, Any]], path: str | Path, image_format: str = "PNG") -> Path:
    """One parquet file, `chosen` / `rejected` as image bytes (binary columns), provenance as
    columns; written to a temp file, then renamed. Reads back with `load_preference_data`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, record in enumerate(records):
        row = {k: _jsonable(v) for k, v in record.items()}
        for key in IMAGE_KEYS:
            row[key] = image_bytes(record[key], f"pair {i}, {key}", image_format)[0]
        rows.append(row)
    if not rows:
        raise DataError("write_image_pairs_parquet: no records")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path

