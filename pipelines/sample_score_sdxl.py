"""Prompts -> samples -> scores -> preference pairs -> HTML report, for Diffusion-DPO on your own
model's samples (best-vs-worst of N per prompt, as on-policy Diffusion-DPO recipes build them).

Tiny run on a CPU (a few minutes; the shipped random-weight SDXL-shaped pipeline and a
random-weight 16-pixel CLIP scorer, so the pairs show the mechanics, not quality):

    .venv/bin/python pipelines/sample_score_sdxl.py --tiny --out runs/sss_tiny

Real run (local folders; nothing is downloaded):

    .venv/bin/python pipelines/sample_score_sdxl.py --model /models/sdxl-base-1.0 \\
        --prompts datasets/partiprompts/PartiPrompts.tsv --num-samples 4 \\
        --scorer pickscore=/models/PickScore_v1,processor=/models/CLIP-ViT-H-14 \\
        --scorer hpsv21=/models/HPS_v2.1_compressed.pt,clip=/models/open_clip_vit_h14:0.5 \\
        --set num_inference_steps=30 --set guidance_scale=5 --margin 0.5 --out runs/sdxl_pairs

Every step is a `mmalign` command run in-process and is resumable (rerun the same line).
Then train on the pairs, unchanged:

    mmalign train configs/tiny/sdxl_dpo.yaml data.train=OUT/pairs/pairs.jsonl data.format=auto
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmalign.cli import main as mmalign
from mmalign.config import resolve_path
from mmalign.generate.prompts import read_prompts

ROOT = Path(__file__).resolve().parents[1]
TINY_SCORER = "pkg://toyworld/scorer"  # the toy world's trained CLIP, when this checkout ships it


def run(*argv: str) -> None:
    print("$ mmalign " + " ".join(argv), flush=True)
    if mmalign(list(argv)) != 0:
        sys.exit(f"step failed: mmalign {' '.join(argv)}")


def prompt_subset(path: str, count: int, out: Path) -> str:
    """The first `count` prompts of `path` as a jsonl (same prompt_index as in the full file)."""
    if count <= 0:
        return path
    target = out / f"prompts_first{count}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in read_prompts(path)[:count]))
    return str(target)


def tiny_scorer(out: Path) -> str:
    """A PickScore-style spec for a 16-pixel CLIP: the shipped toy-world scorer if present, else
    a random-weight one written to OUT/tiny_scorer (scores are then arbitrary but real numbers)."""
    shipped = Path(resolve_path(TINY_SCORER))
    if shipped.is_dir():
        return f"pickscore={shipped},as=clip"
    folder = out / "tiny_scorer"
    if not (folder / "config.json").exists():
        from mmalign.toyworld.models import build_scorer

        model, processor = build_scorer(seed=0)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return f"pickscore={folder},as=clip"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: samples/, pairs/, report.html")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny SDXL, 8 prompts x 4 samples, tiny CLIP")
    p.add_argument("--model", default="pkg://tiny_sdxl", help="local SDXL (diffusers) folder")
    p.add_argument("--prompts", default=str(ROOT / "datasets/partiprompts/PartiPrompts.tsv"))
    p.add_argument("--num-prompts", type=int, default=0, help="use the first K prompts (0: all)")
    p.add_argument("--num-samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="sampling parameter (generate --set)")
    p.add_argument("--scorer", action="append", default=[], help="mmalign score spec NAME=PATH[,k=v][:weight] (repeatable)")
    p.add_argument("--znorm", action="store_true", help="z-normalise scorers before the weighted sum")
    p.add_argument("--strategy", default="best_worst", choices=("best_worst", "margin", "ranked"))
    p.add_argument("--margin", type=float, default=0.0, help="minimum score gap of a pair")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    out = Path(args.out)
    if args.tiny:
        args.num_prompts = args.num_prompts or 8
        args.set = args.set or ["num_inference_steps=2"]
        args.scorer = args.scorer or [tiny_scorer(out)]
    if not args.scorer:
        p.error("give at least one --scorer (or --tiny)")
    samples, pairs, report = out / "samples", out / "pairs", out / "report.html"
    prompts = prompt_subset(args.prompts, args.num_prompts, out)
    run("generate", "--model", args.model, "--prompts", prompts, "--out", str(samples), "--num-samples",
        str(args.num_samples), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
        *sum((["--set", s] for s in args.set), []))
    run("score", str(samples), *sum((["--scorer", s] for s in args.scorer), []), *(["--znorm"] if args.znorm else []))
    run("build-pairs", "scores", str(samples), "--out", str(pairs), "--strategy", args.strategy,
        "--margin", str(args.margin))
    run("report", str(samples), "--pairs", str(pairs / "pairs.jsonl"), "--out", str(report))
    print(f"\nnext: mmalign train configs/tiny/sdxl_dpo.yaml data.train={pairs / 'pairs.jsonl'} data.format=auto")


if __name__ == "__main__":
    main()
