"""Which scorer made a manifest's `score_<column>`: a fingerprint of the scorer spec and its files,
kept in a sidecar beside the manifest (`manifest.jsonl` -> `manifest.scorers.json`):

    {"score_pickscore": {"fingerprint": "3f2a...", "spec": "pickscore=/m/PickScore_v1,..."}, ...}

fingerprint = sha256 over the scorer name, its options (sorted, `as` excluded) and, for PATH and
every option value that names an existing file or folder, each file's relative name, size,
sha256 of its first `HEAD_BYTES` (a safetensors header and first tensors, a config) and of its
last `TAIL_BYTES`. Cheap (a few MiB read per checkpoint) and independent of mtimes, so a copied
model keeps its fingerprint while a retrained or swapped one (other bytes) does not.

`mmalign score` keeps a column only when its recorded fingerprint equals the scorer's; a column
with another fingerprint, or none recorded (a manifest scored before the sidecar existed), is
dropped and recomputed, with a line saying so. Never a stale column kept silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mmalign.errors import DataError
from mmalign.io import atomic_path

HEAD_BYTES = 1 << 20
TAIL_BYTES = 1 << 16


def _file_digest(path: Path, h: Any) -> None:
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(HEAD_BYTES))
        if size > HEAD_BYTES:
            f.seek(max(HEAD_BYTES, size - TAIL_BYTES))
            h.update(f.read(TAIL_BYTES))


def files_digest(path: str | Path, h: Any) -> None:
    """Feed `h` with the identity of a file, or of every file under a folder (sorted)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        h.update(f"{f.relative_to(root) if f != root else f.name}\0".encode())
        _file_digest(f, h)


def scorer_fingerprint(spec: Any) -> str:
    """sha256 hex of a `ScorerSpec`: name, options and the files its PATH / option paths name."""
    h = hashlib.sha256()
    options = {k: v for k, v in sorted(spec.options.items()) if k != "as"}
    h.update(json.dumps([spec.name, spec.path, options], sort_keys=True, default=str).encode())
    for value in [spec.path, *options.values()]:
        if isinstance(value, str) and value and Path(value).exists():
            h.update(b"\0files\0")
            files_digest(value, h)
    return h.hexdigest()


def sidecar_path(manifest: Path) -> Path:
    return manifest.with_name(f"{manifest.stem}.scorers.json")


def read_provenance(manifest: Path) -> dict[str, dict[str, Any]]:
    """{column: {"fingerprint", "spec"}} of a manifest; {} when it has no sidecar."""
    path = sidecar_path(manifest)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); delete it to rescore every column") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of columns; delete it to rescore every column")
    return data


def write_provenance(manifest: Path, provenance: dict[str, dict[str, Any]]) -> None:
    with atomic_path(sidecar_path(manifest)) as tmp:
        tmp.write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def stale_column(rows: list[dict[str, Any]], column: str, recorded: dict[str, Any] | None,
                 fingerprint: str) -> str | None:
    """Why the rows' `column` cannot be kept for a scorer of `fingerprint` (None: keep it)."""
    if not any(column in r for r in rows):
        return None
    if recorded is None:
        return "no scorer fingerprint is recorded for it"
    if recorded.get("fingerprint") != fingerprint:
        return f"it was made by another scorer checkpoint ({recorded.get('spec', '?')})"
    return None
