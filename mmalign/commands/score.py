"""`mmalign score MANIFEST_OR_DIR --scorer NAME=PATH[,key=value...][:weight] ... [--znorm]
[--batch-size B] [--device auto|cpu|cuda] [--overwrite]`: add `score_<name>` columns and the
combined `score` column to a sample manifest (mmalign/generate/manifest.py); the work is
`mmalign.scoring.manifest.score_manifest`."""

from __future__ import annotations

import argparse

SCORER_HELP = ("NAME=PATH[,key=value...][:weight], repeatable. Names: clipscore, pickscore, hpsv2, hpsv21, "
               "aesthetic (needs clip=CLIP_DIR), clap, judge (mode=pointwise|pairwise). "
               "e.g. pickscore=/models/PickScore_v1,processor=/models/CLIP-ViT-H-14:1.0; as=COLUMN renames")


def run(args: argparse.Namespace) -> int:
    from mmalign.scoring.manifest import score_manifest

    print(score_manifest(args.manifest, args.scorer, znorm=args.znorm, batch_size=args.batch_size,
                         device=args.device, overwrite=args.overwrite))
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
