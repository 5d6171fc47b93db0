"""`mmalign score MANIFEST_OR_DIR --scorer NAME=PATH[,key=value...][:weight] ... [--znorm]
[--batch-size B] [--device auto|cpu|cuda] [--overwrite]`: add `score_<name>` columns and the
combined `score` column to a sample manifest (mmalign/generate/manifest.py)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

SCORER_HELP = ("NAME=PATH[,key=value...][:weight], repeatable. Names: clipscore, pickscore, hpsv2, hpsv21, "
               "aesthetic (needs clip=CLIP_DIR), clap, judge (mode=pointwise|pairwise). "
               "e.g. pickscore=/models/PickScore_v1,processor=/models/CLIP-ViT-H-14:1.0; as=COLUMN renames")
SAVE_EVERY_S = 60.0


def _media(row: dict[str, Any], root: Path) -> Any:
    if row["kind"] == "text":
        return row["text"]
    path = Path(row["path"])
    return str(path if path.is_absolute() else root / path)


def _score_rows(scorer: Any, rows: list[dict[str, Any]], root: Path) -> list[float | None]:
    """One scorer call on rows of one kind -> JSON-ready values (NaN -> None)."""
    conditions, outputs = [r["prompt"] for r in rows], [_media(r, root) for r in rows]
    if getattr(scorer, "takes_images", False):  # the judge also sees a VLM prompt's images
        images = [[str(root / p) if not Path(p).is_absolute() else p for p in r.get("images", [])] for r in rows]
        values = scorer.score(conditions, outputs, images=images, kind=rows[0]["kind"])
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


def _run_scorer(spec: Any, rows: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> str:
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
    batches = _batches(cls.is_groupwise(spec.options), rows, column, args.batch_size, args.overwrite)
    if not batches:
        return f"{spec.column}: 0 new ({len(rows)} kept)"
    scorer = load_scorer(spec, device=args.device, batch_size=args.batch_size)
    done, last_save = 0, time.monotonic()
    with tqdm(total=sum(len(b) for b in batches), desc=f"score {spec.column}", unit="sample") as bar:
        for batch in batches:
            for row, value in zip(batch, _score_rows(scorer, batch, path.parent)):
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


def _combine_rows(rows: list[dict[str, Any]], specs: list[Any], znorm: bool) -> int:
    """Write the combined `score` of the given scorers; returns how many rows got a number."""
    import torch

    from mmalign.scoring import combine

    columns = {s.column: torch.tensor([math.nan if r.get(f"score_{s.column}") is None else r[f"score_{s.column}"]
                                       for r in rows], dtype=torch.float64) for s in specs}
    total = combine(columns, {s.column: s.weight for s in specs}, znorm=znorm)
    for row, value in zip(rows, total.tolist()):
        row["score"] = float(value) if math.isfinite(value) else None
    return sum(r["score"] is not None for r in rows)


def run(args: argparse.Namespace) -> int:
    import torch

    from mmalign.errors import ConfigError
    from mmalign.generate.manifest import manifest_path, read_manifest, write_manifest
    from mmalign.scoring import parse_spec

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    path = manifest_path(args.manifest)
    rows = read_manifest(path)
    specs = [parse_spec(s) for s in args.scorer]
    columns = [s.column for s in specs]
    if len(set(columns)) != len(columns):
        raise ConfigError(f"two scorers write the same column ({columns}); rename one with ,as=NAME")
    parts = []
    try:
        for spec in specs:
            parts.append(_run_scorer(spec, rows, path, args))
    finally:
        write_manifest(rows, path)  # also on a crash or Ctrl-C: finished batches are kept
    combined = _combine_rows(rows, specs, args.znorm)
    write_manifest(rows, path)
    how = "z-normalised " if args.znorm else ""
    weights = " + ".join(f"{s.weight:g}*{s.column}" for s in specs)
    print(f"[mmalign] scored {len(rows)} samples: {'; '.join(parts)}; score = {how}{weights} on {combined} rows "
          f"({len(rows) - combined} missing a score) -> {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score samples: mmalign score MANIFEST_OR_DIR --scorer NAME=PATH[:weight] ...")
    p.add_argument("manifest", metavar="MANIFEST_OR_DIR", help="manifest.jsonl or the folder holding it")
    p.add_argument("--scorer", action="append", required=True, metavar="NAME=PATH[:W]", help=SCORER_HELP)
    p.add_argument("--znorm", action="store_true",
                   help="z-normalise each scorer over the manifest before the weighted sum (scales differ: "
                        "PickScore ~20, HPS ~0.27, aesthetic ~6)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--overwrite", action="store_true", help="recompute columns already present")
    p.set_defaults(func=run)
