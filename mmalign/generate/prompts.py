"""Prompt files for `mmalign generate`.

    .txt          one prompt per line; blank lines are skipped
    .jsonl        {"prompt": str | chat messages, "images": [paths] (optional), "id": ... (optional)}
                  edit models: {"prompt": instruction, "source_image": path} (or "source_images": [paths])
                  image-to-video models: {"prompt": ..., "source_image": first frame} (generate/video.py)
    .csv / .tsv   a `prompt` column (or PartiPrompts' `Prompt`); other columns are ignored

A prompt's `prompt_index` is its position among the prompts of the file (0, 1, ...; skipped
blank lines do not count), so the same file always gives the same indices, sample ids and
seeds. Image paths of a jsonl prompt are resolved against the file's folder and kept as
absolute paths, so manifest rows point at the condition images wherever the manifest moves.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from mmalign.data.jsonl import iter_jsonl, read_text
from mmalign.data.media import record_images
from mmalign.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")
PROMPT_COLUMNS = ("prompt", "Prompt")


def _from_txt(path: Path) -> list[dict[str, Any]]:
    return [{"prompt": line.strip()} for line in read_text(path).splitlines() if line.strip()]


def _images(values: list[Any], root: Path, where: str) -> list[str]:
    out = []
    for v in values:
        if not isinstance(v, str):
            raise DataError(f"{where}: 'images' must hold paths, got {v!r}")
        p = Path(v) if Path(v).is_absolute() else root / v
        if not p.is_file():
            raise DataError(f"{where}: image not found: {p}")
        out.append(str(p.resolve()))
    return out


def _from_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, row in iter_jsonl(path):
        where = f"{path}: line {n}"
        if "prompt" not in row:
            raise DataError(f"{where}: no 'prompt' key")
        if not isinstance(row["prompt"], (str, list)) or not row["prompt"]:
            raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of chat messages")
        record: dict[str, Any] = {"prompt": row["prompt"]}
        images = _images(record_images(row), path.parent, where)
        if images:
            record["images"] = images
        for key in ("source_image", "source_images"):  # an edit model's source image(s)
            if key in row:
                values = row[key] if isinstance(row[key], list) else [row[key]]
                found = _images(values, path.parent, f"{where}, {key}")
                record[key] = found if key == "source_images" else found[0]
        if "id" in row:
            record["prompt_id"] = row["id"]
        records.append(record)
    return records


def _from_table(path: Path) -> list[dict[str, Any]]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        column = next((c for c in PROMPT_COLUMNS if c in columns), None)
        if column is None:
            raise DataError(f"{path}: no 'prompt' (or 'Prompt') column; columns: {', '.join(columns) or 'none'}")
        records = []
        for n, row in enumerate(reader, start=2):
            text = (row.get(column) or "").strip()
            if not text:
                raise DataError(f"{path}: line {n} has an empty '{column}'")
            records.append({"prompt": text})
    return records


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompts of a prompt file: [{"prompt", optional "images", "source_image(s)", "prompt_id"}] in
    file order; a DataError names the file (and line) when it is missing, empty or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown prompt file type '{path.suffix}' (use {', '.join(SUFFIXES)})")
    read = {".txt": _from_txt, ".jsonl": _from_jsonl}.get(path.suffix, _from_table)
    records = read(path)
    if not records:
        raise DataError(f"{path}: no prompts in the file")
    return records


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: the string itself, or the user turns of chat messages joined."""
    if isinstance(prompt, str):
        return prompt
    parts = []
    for m in prompt:
        content = m.get("content", "")
        if m.get("role", "user") == "user":
            parts.append(content if isinstance(content, str)
                         else "".join(c.get("text", "") for c in content if c.get("type") == "text"))
    return "\n".join(parts)
