"""`mmalign build-pairs take SOURCE... --out FILE [--n N --seed S]`: pool preference records from
pair files and online runs into one file, optionally a seeded subset of N of them.

A SOURCE is a records file (jsonl / json / parquet, what `data.train` reads) or an online run's
folder (its `output_dir`, or its `rounds/` folder): the records of every COMPLETE round
(`rounds/round_NNNNN/records.jsonl` with its `meta.json`), in round order, i.e. exactly the pairs
the run trained on. Media paths of `image` / `images` that are relative are resolved against their
source and rewritten relative to the output file's folder, so the output trains as its sources do.

--n N keeps N records drawn uniformly without replacement from the pool (a permutation seeded by
mix_seed(seed); kept in pool order), e.g. offline pairs at the budget of an online run:

    mmalign build-pairs take pairs/inject.jsonl pairs/corrupt.jsonl --n 102 --out pairs/same_n.jsonl
    mmalign build-pairs take runs/online --out pairs/online_rounds.jsonl   # SFT on its chosen answers

Output rows: the source records unchanged but for the rewritten paths; a pool with fewer than N
records, or a folder without complete rounds, is one DataError line naming it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

from mmalign.errors import DataError

MEDIA_KEYS = ("image", "images")


def round_files(folder: Path) -> list[Path]:
    """records.jsonl of the complete rounds (meta.json written) under `folder` or `folder/rounds`."""
    rounds = folder / "rounds" if (folder / "rounds").is_dir() else folder
    files = [d / "records.jsonl" for d in sorted(rounds.glob("round_*")) if (d / "meta.json").is_file()]
    if not files:
        raise DataError(f"{folder}: no complete online rounds (round_*/meta.json) found")
    return files


def rebase(record: dict[str, Any], source_dir: Path, out_dir: Path) -> dict[str, Any]:
    """`record` with relative image paths re-expressed relative to `out_dir` (absolute ones kept)."""
    def move(p: Any) -> Any:
        if not isinstance(p, str) or os.path.isabs(p):
            return p
        return os.path.relpath(os.path.abspath(source_dir / p), os.path.abspath(out_dir))

    moved = dict(record)
    for key in MEDIA_KEYS:
        if isinstance(record.get(key), list):
            moved[key] = [move(p) for p in record[key]]
        elif key in record:
            moved[key] = move(record[key])
    return moved


def pool_records(sources: Sequence[str | Path], out_dir: Path) -> list[dict[str, Any]]:
    """Every record of `sources` in order (module docstring), paths rebased onto `out_dir`."""
    from mmalign.data.preference import read_records

    pooled = []
    for source in map(Path, sources):
        if not source.exists():
            raise DataError(f"build-pairs take: source not found: {source}")
        files = round_files(source) if source.is_dir() else [source]
        for f in files:
            pooled += [rebase(r, f.parent, out_dir) for r in read_records(f)]
    return pooled


def take_records(records: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """All of `records` (n None) or n of them: sorted(randperm(len, generator seeded mix_seed(seed))[:n])."""
    import torch

    from mmalign.seeds import RUN, mix_seed

    if n is None:
        return list(records)
    if n < 0 or n > len(records):
        raise DataError(f"build-pairs take: --n {n} but the sources hold {len(records)} records")
    g = torch.Generator().manual_seed(mix_seed(seed, strides=(RUN,)))
    keep = sorted(torch.randperm(len(records), generator=g)[:n].tolist())
    return [records[i] for i in keep]


def run(args: argparse.Namespace) -> int:
    from mmalign.io import write_jsonl_atomic

    out = Path(args.out)
    pooled = pool_records(args.sources, out.parent)
    kept = take_records(pooled, args.n, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out, kept, ensure_ascii=False)
    print(f"[mmalign] build-pairs take: {len(kept)} of {len(pooled)} records from {len(args.sources)} "
          f"source(s); wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("take", help="pool records of pair files / online runs' rounds, optionally N of them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="records files, or online runs' output folders (their rounds)")
    p.add_argument("--out", required=True, help="output records jsonl (image paths relative to it)")
    p.add_argument("--n", type=int, help="keep N records drawn uniformly without replacement (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
