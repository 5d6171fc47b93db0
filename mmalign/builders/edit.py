"""Edit pairs: the source image(s) of an edit model's samples carried into its preference records.

`mmalign generate` of an edit model (QwenImageEditPipeline, FluxKontextPipeline) on prompt records
{"prompt": instruction, "source_image": path} (QwenImageEditPlusPipeline: also "source_images": [paths])
keeps each sample's source(s) in its manifest row; `mmalign score` scores the samples; `mmalign
build-pairs scores` then writes, per selected pair, {"source_image" | "source_images", "prompt",
"chosen", "rejected"} (+ provenance): the record the edit families train
on (mmalign/modalities/edit.py). `edit_source_fields` copies each source beside the pair file
(images/<name>-<index>-source<k>.<ext>), so the pair folder is self-contained.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mmalign.errors import DataError
from mmalign.io import atomic_path

SOURCE, SOURCES = "source_image", "source_images"


def edit_source_fields(row: dict[str, Any], root: Path, out_dir: Path, name: str, index: int) -> dict[str, Any]:
    """{"source_image": relative path} (or {"source_images": [...]}) of a manifest row's sources copied
    into out_dir/images/, paths relative to out_dir; {} for a row without a source. root: the
    manifest's folder (relative source paths are resolved against it)."""
    key = SOURCES if SOURCES in row else SOURCE if SOURCE in row else None
    if key is None:
        return {}
    values = row[key] if key == SOURCES else [row[key]]
    copied = []
    for k, value in enumerate(values):
        src = Path(value) if Path(value).is_absolute() else root / value
        if not src.is_file():
            raise DataError(f"sample {row.get('id')}: source image {src} not found")
        relative = f"images/{name}-{index:06d}-source{k}{src.suffix}"
        with atomic_path(out_dir / relative) as tmp:
            shutil.copyfile(src, tmp)
        copied.append(relative)
    return {key: copied if key == SOURCES else copied[0]}
