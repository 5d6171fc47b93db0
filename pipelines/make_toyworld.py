"""Write the toy world to disk: images, captions and COCO annotations for every split.

Run from the repository root (seconds):

    .venv/bin/python pipelines/make_toyworld.py runs/toyworld

Writes `<out>/objects/` (16×16, one object: the text-to-image side) and `<out>/scenes/`
(32×32, 1-3 objects: the captioner side), each with splits `train`, `test` (held-out images,
disjoint from train by construction) and `combos` (held-out colour-shape combinations,
report them separately): `images/`, `{split}.jsonl`, `instances_{split}.json`,
`captions_{split}.json`. Everything is deterministic from `--seed` (see mmalign/toyworld/world.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmalign.toyworld.world import write_world

SIZES = {"train": 2000, "test": 500, "combos": 200}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for kind in ("objects", "scenes"):
        for split, n in SIZES.items():
            paths = write_world(args.out / kind, n, args.seed, split, kind)
            print(f"{kind}/{split}: {n} images -> {paths['jsonl']}, {paths['instances'].name}, {paths['captions'].name}")
