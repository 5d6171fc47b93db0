"""Media fields of training data checked before training: paths must stay inside the data
folder (`data.allow_outside_paths`), and images may be decoded up front (`data.verify_media`).

verify_media:
    auto   decode every image of a file of at most `AUTO_VERIFY_MAX_ROWS` rows (the same bound
           as the Pick-a-Pic reader); larger files are checked when a batch reads them
    all    decode every image of every file at load
    none   never at load (an unreadable image stops the run at the batch that reads it); also
           what a run with a latent cache (`diffusion.cache_dir`) does: it reads no images
A row with an unreadable image found at load is skipped: each is printed with its file and row
(the first `MAX_REPORTED`), and the count is printed per file. The same rows are skipped on
every resume and in every process (the check is deterministic).

A media path leaves the data folder when it is absolute, holds `..`, or resolves (symlinks
followed) outside the folder; it is a `DataError` naming the file, row and field unless
`data.allow_outside_paths: true`. Only text-free fields are checked: a record's `image` /
`images`, and its answers when the model's outputs are media (image and audio families).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.data.media import image_readable, record_images
from mmalign.errors import DataError

AUTO_VERIFY_MAX_ROWS = 5000
MAX_REPORTED = 10
VERIFY_CHOICES = ("auto", "all", "none")
OUTPUT_FIELDS = {"pair": ("chosen", "rejected"), "unpaired": ("completion",), "ranked": ("completions",)}


@dataclass(frozen=True)
class MediaPolicy:
    """What `guard_media` checks. outputs_are_media: answers are images (decoded when verified)
    or audio (paths checked only)."""

    verify: str = "none"
    allow_outside: bool = True
    outputs_are_media: bool = False
    outputs_are_images: bool = False


def media_policy(cfg: Any) -> MediaPolicy:
    """The policy of a run config: `data.verify_media`, `data.allow_outside_paths`, and whether
    its family's outputs are media (`Family.kind` image or audio). With a latent cache
    (`diffusion.cache_dir`) nothing is decoded at load: training reads the cache, not the images,
    and `mmalign cache` stops at an unreadable one naming its row."""
    from mmalign.families import get_family

    kind = get_family(cfg.modality).kind
    verify = "none" if kind == "image" and cfg.diffusion.cache_dir else cfg.data.verify_media
    return MediaPolicy(verify, cfg.data.allow_outside_paths, kind in ("image", "audio"), kind == "image")


def _path_of(value: Any) -> str | None:
    """The file path a media value names (None for bytes, inline images, or a dict with bytes)."""
    if isinstance(value, dict):
        return None if value.get("bytes") else value.get("path")
    return value if isinstance(value, str) else None


def check_inside(value: Any, root: Path, where: str) -> None:
    """Refuse a media path that leaves `root`: absolute, with `..`, or a symlink out of it."""
    path = _path_of(value)
    if not path:
        return
    p = Path(path)
    outside = p.is_absolute() or ".." in p.parts
    if not outside:
        outside = not (root / p).resolve().is_relative_to(root.resolve())
    if outside:
        raise DataError(f"{where}: media path '{path}' leaves the data folder {root} (absolute, '..' or a "
                        "symlink out); move the file into the folder or set data.allow_outside_paths: true")


def _fields(record: dict[str, Any], kind: str, policy: MediaPolicy) -> list[tuple[str, Any, bool]]:
    """(field name, value, is an image) of every media value of a record."""
    out = [(f"images[{j}]", v, True) for j, v in enumerate(record_images(record))]
    if policy.outputs_are_media:
        for name in OUTPUT_FIELDS[kind]:
            values = record.get(name)
            if name == "completions" and isinstance(values, list):
                out += [(f"{name}[{j}]", v, policy.outputs_are_images) for j, v in enumerate(values)]
            elif values is not None:
                out.append((name, values, policy.outputs_are_images))
    return out


def _readable(value: Any, root: Path) -> bool:
    path = _path_of(value)
    if path is not None and not Path(path).is_absolute():
        value = str(root / path)
    return image_readable(value)


def guard_media(records: list[dict[str, Any]], source: str | Path, root: Path, kind: str,
                policy: MediaPolicy) -> list[dict[str, Any]]:
    """`records` of data file `source` (media resolved against `root`) with the paths checked
    and, when verified, the rows with an unreadable image dropped (printed and counted)."""
    verify = policy.verify == "all" or (policy.verify == "auto" and len(records) <= AUTO_VERIFY_MAX_ROWS)
    if policy.allow_outside and not verify:
        return records
    kept, skipped = [], 0
    for i, record in enumerate(records):
        bad = None
        for name, value, is_image in _fields(record, kind, policy):
            if not policy.allow_outside:
                check_inside(value, root, f"{source}: row {i}, {name}")
            if verify and is_image and bad is None and not _readable(value, root):
                bad = name
        if bad is None:
            kept.append(record)
            continue
        skipped += 1
        if skipped <= MAX_REPORTED:
            print(f"[mmalign] data: skipping {source} row {i}: unreadable image in {bad}"
                  + (" (further ones only counted)" if skipped == MAX_REPORTED else ""))
    if skipped:
        print(f"[mmalign] data: {source}: {skipped} of {len(records)} rows skipped (unreadable image), "
              f"{len(kept)} kept")
    if not kept:
        raise DataError(f"{source}: no readable rows ({skipped} with an unreadable image)")
    return kept


def check_verify_choice(value: str) -> None:
    """`data.verify_media` is one of auto, all, none (a ConfigError naming the key otherwise)."""
    from mmalign.errors import ConfigError

    if value not in VERIFY_CHOICES:
        raise ConfigError(f"data.verify_media must be one of {', '.join(VERIFY_CHOICES)}, got {value!r}")


def guard_parts(parts: Sequence[Sequence[dict[str, Any]]], paths: Sequence[str | Path], roots: Sequence[Path],
                kind: str, policy: MediaPolicy) -> list[Sequence[dict[str, Any]]]:
    """`guard_media` on each part read into memory (lists); lazy dataset readers (Pick-a-Pic,
    published VLM formats) check their own media on access and are passed through."""
    return [guard_media(p, str(path), root, kind, policy) if isinstance(p, list) else p
            for p, path, root in zip(parts, paths, roots)]
