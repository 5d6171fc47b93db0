"""The sample manifest: what `mmalign generate` writes and `score`, `build-pairs scores`,
`report` and `eval images` read.

    out_dir/manifest.jsonl    one line per sample, appended as samples finish
    out_dir/media/...         the sample files (images .png, audio .wav), paths relative to out_dir

A row holds:
    id            "<prompt_index>-<sample>", e.g. "000012-003": unique, the resume key
    prompt_index  int, position of the prompt in the prompt file
    prompt        str, the text condition
    sample        int, 0..N-1 within the prompt
    seed          int, the sample's own seed (same seed + model + params -> same output)
    kind          "image" | "video" | "audio" | "text"
    path          media file relative to out_dir (image / video / audio); absent for text
    text          the generated text (text / VLM answers); absent for media
    images        condition images of a VLM prompt (list of paths), when any
    model         str, the model folder (or name) that generated it
    params        dict, the sampling parameters (steps, guidance, temperature, ...)
    score_<name>  float, one column per scorer, added by `mmalign score`
    score         float, the weighted combination used for ranking, added by `mmalign score`

Rows are appended one JSON line at a time with a flush, so a killed run loses at most the
line being written; `read_manifest` ignores a torn last line and the next run regenerates it.
Whole-manifest rewrites (adding score columns) go through `atomic_path`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

from mmalign.data.jsonl import iter_jsonl
from mmalign.errors import DataError
from mmalign.io import atomic_path, write_jsonl_atomic

MANIFEST = "manifest.jsonl"
REQUIRED = ("id", "prompt_index", "prompt", "sample", "seed", "kind")
KINDS = ("image", "video", "audio", "text")


def sample_id(prompt_index: int, sample: int) -> str:
    return f"{prompt_index:06d}-{sample:03d}"


def media_rows(items: list[dict[str, Any]], outputs: list[Any], out_dir: Path, kind: str, suffix: str,
               save: Callable[[Any, Path], None]) -> list[dict[str, Any]]:
    """Finished rows of media samples: each output saved atomically (`save(output, tmp_path)`)
    as out_dir/media/<id><suffix> before its row {**item, kind, path} exists."""
    rows = []
    for item, output in zip(items, outputs, strict=True):
        rel = f"media/{item['id']}{suffix}"
        with atomic_path(out_dir / rel) as tmp:
            save(output, tmp)
        rows.append({**item, "kind": kind, "path": rel})
    return rows


def manifest_path(path: str | Path) -> Path:
    """`path` itself when it names a file, else `path/manifest.jsonl`."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() or not path.suffix else path


def _check(row: dict[str, Any], where: str) -> None:
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise DataError(f"{where}: manifest row has no {', '.join(missing)}")
    if row["kind"] not in KINDS:
        raise DataError(f"{where}: kind {row['kind']!r} is not one of {KINDS}")
    if row["kind"] == "text" and "text" not in row:
        raise DataError(f"{where}: a text sample has no 'text'")
    if row["kind"] != "text" and "path" not in row:
        raise DataError(f"{where}: a {row['kind']} sample has no 'path'")


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a manifest, in file order. A torn LAST line (a killed writer) is
    dropped; a bad line elsewhere or a duplicate id is an error naming the line."""
    path = manifest_path(path)
    if not path.exists():
        raise DataError(f"manifest not found: {path}")
    rows, seen = [], set()
    for n, row in iter_jsonl(path, tolerate_torn_end=True):  # a torn last line: the writer died mid-line
        _check(row, f"{path}: line {n}")
        if row["id"] in seen:
            raise DataError(f"{path}: line {n} repeats id {row['id']}")
        seen.add(row["id"])
        rows.append(row)
    return rows


class ManifestWriter:
    """Appends rows to `out_dir/manifest.jsonl` (one process writes one file; several
    processes write `manifest.rank<k>.jsonl` and the main process merges them with
    `merge_manifests`). Drops a torn last line first so appends start on a clean line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # torn line from a killed run
                keep = text[: text.rfind("\n") + 1]
                try:  # a complete row without its newline counts as a row (as read_manifest reads it)
                    json.loads(text[len(keep):])
                    keep = text + "\n"
                except json.JSONDecodeError:
                    pass
                with atomic_path(self.path) as tmp:
                    tmp.write_text(keep)
        self._file = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        _check(row, f"{self.path}: new row")
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_manifest(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Rewrite a whole manifest atomically (e.g. with new score columns), sorted by id."""
    path = manifest_path(path)
    rows = sorted(rows, key=lambda r: r["id"])
    for i, row in enumerate(rows):
        _check(row, f"row {i}")
    write_jsonl_atomic(path, rows, ensure_ascii=False)
    return path


def merge_manifests(parts: Iterable[str | Path], path: str | Path) -> Path:
    """Merge per-process manifests into one (atomically), keeping the first row of each id."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for row in read_manifest(part):
            merged.setdefault(row["id"], row)
    return write_manifest(merged.values(), path)


def score_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The `score_<name>` columns present in every row."""
    if not rows:
        return []
    return sorted(k for k in rows[0] if k.startswith("score_") and all(k in r for r in rows))
