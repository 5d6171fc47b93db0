"""`python -m mmalign.toyworld`: write the toy world's data to disk (the world is code, not data).

    python -m mmalign.toyworld images OUT --kind scenes --split train --n 2000 --seed 0
        rendered images + {split}.jsonl + COCO instances/captions json (`world.write_world`)
    python -m mmalign.toyworld prompts OUT.txt --split train [--repeat 16]
        the image side's prompts ("a red circle"), one per line: `train` = TRAIN_PROMPTS,
        `heldout` = HELDOUT_PROMPTS (colour-shape combinations never trained on); --repeat
        writes each prompt that many times in a row, so `mmalign generate --num-samples N`
        gives `repeat` independent groups of N samples per prompt (one best-vs-worst pair each)
    python -m mmalign.toyworld amber|objhal|mmhal OUT --n 100 --seed 0 --split test
        the scenes converted to that benchmark's files, truths from the exact annotations
        (`benchmarks.py`); prints the `mmalign eval ...` command that runs the toy captioner on them
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def write_prompts(out: str | Path, split: str, repeat: int = 1) -> Path:
    """Write the `split` prompts ("train" | "heldout"), each `repeat` times, to `out`."""
    from mmalign.io import atomic_path
    from mmalign.toyworld.world import HELDOUT_PROMPTS, TRAIN_PROMPTS

    prompts = {"train": TRAIN_PROMPTS, "heldout": HELDOUT_PROMPTS}[split]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text("".join(f"{p}\n" for p in prompts for _ in range(repeat)))
    return out


BENCHMARKS = ("amber", "objhal", "mmhal")


def write_benchmark(name: str, out: str | Path, n: int, seed: int, split: str) -> str:
    """Write benchmark `name`'s files for `n` scenes; returns the line to print (with the eval command)."""
    from mmalign.toyworld import benchmarks

    model = "--model pkg://toyworld/captioner"
    if name == "amber":
        p = benchmarks.write_amber(out, n, seed, split)
        command = f"mmalign eval amber --data {p['data']} --images {p['images']} {model} --max-new-tokens 32"
    elif name == "objhal":
        p = benchmarks.write_objhal(out, n, seed, split)
        command = (f"mmalign eval objhal --questions {p['questions']} --annotations {p['annotations']} "
                   f"--captions {p['captions']} --vocabulary {p['vocabulary']} --images {p['images']} {model} "
                   "--max-new-tokens 32")
    else:
        p = benchmarks.write_mmhal(out, n, seed, split)
        command = (f"mmalign eval mmhal --questions {p['questions']} --judge rules:toyworld --images {p['images']} "
                   f"{model} --max-new-tokens 32")
    return (f"[toyworld] {n} scenes of split {split} (seed {seed}) as {name} data -> {out}\n"
            f"  run: {command} --out {name}.json")


def main(argv: Sequence[str] | None = None) -> int:
    from mmalign.toyworld.world import SPLITS, write_world

    parser = argparse.ArgumentParser(prog="python -m mmalign.toyworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("images", help="render n images of a split with their COCO annotations")
    p.add_argument("out")
    p.add_argument("--kind", choices=("scenes", "objects"), default="scenes")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prompts", help="the image side's prompt file")
    p.add_argument("out")
    p.add_argument("--split", choices=("train", "heldout"), default="train")
    p.add_argument("--repeat", type=int, default=1)
    for name in BENCHMARKS:
        p = sub.add_parser(name, help=f"scenes as {name} data (exact annotations) for `mmalign eval {name}`")
        p.add_argument("out")
        p.add_argument("--split", choices=SPLITS, default="test")
        p.add_argument("--n", type=int, default=96 if name == "mmhal" else 100)
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what in BENCHMARKS:
        print(write_benchmark(args.what, args.out, args.n, args.seed, args.split))
    elif args.what == "images":
        paths = write_world(args.out, args.n, args.seed, args.split, args.kind)
        print(f"[toyworld] {args.n} {args.kind} of split {args.split} (seed {args.seed}) -> {paths['jsonl']}, "
              f"{paths['instances'].name}, {paths['captions'].name}")
    else:
        path = write_prompts(args.out, args.split, args.repeat)
        print(f"[toyworld] {args.split} prompts x{args.repeat} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
