"""Score a sample manifest (mmalign/generate/manifest.py) in place: `score_<name>` columns and
the combined `score` column, what `mmalign score` and `mmalign eval images` run."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SAVE_EVERY_S = 60.0


def _media(row: dict[str, Any], root: Path) -> Any:
    if row["kind"] == "text":
        return row["text"]
    path = Path(row["path"])
    return str(path if path.is_absolute() else root / path)


def score_rows(scorer: Any, rows: list[dict[str, Any]], root: Path) -> list[float | None]:
    """One scorer call on rows of one kind -> JSON-ready values (NaN -> None)."""
    conditions, outputs = [r["prompt"] for r in rows], [_media(r, root) for r in rows]
    if getattr(scorer, "takes_images", False):  # the judge also sees a VLM prompt's images
        images = [[str(root / p) if not Path(p).is_absolute() else p for p in r.get("images", [])] for r in rows]
        values = scorer.score(conditions, outputs, images=images, kind=rows[0]["kind"])
    elif getattr(scorer, "takes_objects", False):  # the annotation scorer reads the row's image objects
        values = scorer.score(conditions, outputs, objects=[r.get("objects") for r in rows],
                              ids=[r.get("id") for r in rows])
    else:
        values = scorer.score(conditions, outputs)
    return [None if not math.isfinite(v) else float(v) for v in values.tolist()]


def _batches(groupwise: bool, rows: list[dict[str, Any]], column: str, batch_size: int,
             overwrite: bool) -> list[list[dict]]:
    """Rows to (re)score, in batches of one kind. A groupwise scorer (pairwise judge) scores
    whole prompt groups: a group is redone when any of its rows lacks the column."""
    todo = [r for r in rows if overwrite or column not in r]
    if groupwise:
        groups: dict[Any, list[dict]] = {}
        for r in rows:
            groups.setdefault(r["prompt_index"], []).append(r)
        redo = {r["prompt_index"] for r in todo}
        return [g for key, g in groups.items() if key in redo]
    by_kind: dict[str, list[dict]] = {}
    for r in todo:
        by_kind.setdefault(r["kind"], []).append(r)
    return [rs[i:i + batch_size] for rs in by_kind.values() for i in range(0, len(rs), batch_size)]


def _check_provenance(spec: Any, rows: list[dict[str, Any]], column: str, path: Path) -> bool:
    """Record the scorer's fingerprint for `column` (mmalign/scoring/provenance.py); a column made
    by another scorer (or of unknown origin) is dropped from every row and the manifest saved
    BEFORE the new fingerprint is recorded, so no kill can leave old values under the new one.
    Returns True when the column was dropped (everything is rescored)."""
    from mmalign.generate.manifest import write_manifest
    from mmalign.scoring.provenance import read_provenance, scorer_fingerprint, stale_column, write_provenance

    fingerprint = scorer_fingerprint(spec)
    provenance = read_provenance(path)
    why = stale_column(rows, column, provenance.get(column), fingerprint)
    if why is not None:
        print(f"[mmalign] score: recomputing {column} of {path}: {why}")
        for row in rows:
            row.pop(column, None)
        write_manifest(rows, path)
    if provenance.get(column, {}).get("fingerprint") != fingerprint:
        options = "".join(f",{k}={v}" for k, v in sorted(spec.options.items()))
        provenance[column] = {"fingerprint": fingerprint, "spec": f"{spec.name}={spec.path}{options}"}
        write_provenance(path, provenance)
    return why is not None


def _run_scorer(spec: Any, rows: list[dict[str, Any]], path: Path, batch_size: int, device: str,
                overwrite: bool) -> str:
    """Fill `score_<column>` for the rows that need it; returns this scorer's summary fragment."""
    from tqdm.auto import tqdm

    from mmalign.errors import DataError
    from mmalign.generate.manifest import write_manifest
    from mmalign.scoring import load_scorer, scorer_class

    column = f"score_{spec.column}"
    cls = scorer_class(spec.name)
    bad = sorted({r["kind"] for r in rows} - set(cls.kinds))
    if bad:
        raise DataError(f"{path}: scorer {spec.name} scores {'/'.join(cls.kinds)} samples, the manifest has {bad}")
    overwrite = _check_provenance(spec, rows, column, path) or overwrite
    batches = _batches(cls.is_groupwise(spec.options), rows, column, batch_size, overwrite)
    if not batches:
        return f"{spec.column}: 0 new ({len(rows)} kept)"
    scorer = load_scorer(spec, device=device, batch_size=batch_size)
    done, last_save = 0, time.monotonic()
    with tqdm(total=sum(len(b) for b in batches), desc=f"score {spec.column}", unit="sample") as bar:
        for batch in batches:
            for row, value in zip(batch, score_rows(scorer, batch, path.parent)):
                row[column] = value
            done += len(batch)
            bar.update(len(batch))
            if time.monotonic() - last_save > SAVE_EVERY_S:  # a killed run keeps what it scored
                write_manifest(rows, path)
                last_save = time.monotonic()
    missing = sum(r[column] is None for r in rows)
    extra = "".join(f", {v} {k.replace('_', ' ')}" for k, v in scorer.stats().items()
                    if "unparsed" in k or "inconsistent" in k)
    return f"{spec.column}: {done} new ({len(rows) - done} kept{extra}, {missing} without a score)"


def combine_rows(rows: list[dict[str, Any]], specs: list[Any], znorm: bool) -> int:
    """Write the combined `score` of the given scorers; returns how many rows got a number."""
    import torch

    from mmalign.scoring import combine

    columns = {s.column: torch.tensor([math.nan if r.get(f"score_{s.column}") is None else r[f"score_{s.column}"]
                                       for r in rows], dtype=torch.float64) for s in specs}
    total = combine(columns, {s.column: s.weight for s in specs}, znorm=znorm)
    for row, value in zip(rows, total.tolist()):
        row["score"] = float(value) if math.isfinite(value) else None
    return sum(r["score"] is not None for r in rows)


def score_manifest(manifest: str | Path, scorers: Sequence[str], *, znorm: bool = False, batch_size: int = 16,
                   device: str = "auto", overwrite: bool = False) -> str:
    """Add each scorer's `score_<column>` (rows already scored are kept unless `overwrite`) and the
    combined `score` to the manifest (manifest.jsonl or its folder), saved as it goes; returns the
    one-line summary. scorers: specs `NAME=PATH[,key=value...][:weight]`; device: auto | cpu | cuda."""
    import torch

    from mmalign.errors import ConfigError
    from mmalign.generate.manifest import manifest_path, read_manifest, write_manifest
    from mmalign.scoring import parse_spec

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = manifest_path(manifest)
    rows = read_manifest(path)
    specs = [parse_spec(s) for s in scorers]
    columns = [s.column for s in specs]
    if len(set(columns)) != len(columns):
        raise ConfigError(f"two scorers write the same column ({columns}); rename one with ,as=NAME")
    parts = []
    try:
        for spec in specs:
            parts.append(_run_scorer(spec, rows, path, batch_size, device, overwrite))
    finally:
        write_manifest(rows, path)  # also on a crash or Ctrl-C: finished batches are kept
    combined = combine_rows(rows, specs, znorm)
    write_manifest(rows, path)
    how = "z-normalised " if znorm else ""
    weights = " + ".join(f"{s.weight:g}*{s.column}" for s in specs)
    return (f"[mmalign] scored {len(rows)} samples: {'; '.join(parts)}; score = {how}{weights} on {combined} rows "
            f"({len(rows) - combined} missing a score) -> {path}")
