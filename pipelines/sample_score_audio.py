"""Prompts -> clips -> CLAP scores -> preference pairs -> HTML report: the Audio-Alpaca recipe
(Tango 2, METHODS.md §2) for your own text-to-audio model. Each prompt is sampled N times as
written and N times per perturbed variant (concepts removed or reordered: the prompt is split
on commas, "and", "then", "while", "with"); every clip is scored with CLAP against the ORIGINAL
prompt, and best-vs-worst pairs above a margin are kept per original prompt.

Tiny run on a CPU (well under a minute; a random-weight AudioLDM2-shaped pipeline and a
random-weight CLAP, so the pairs show the mechanics, not quality):

    .venv/bin/python pipelines/sample_score_audio.py --tiny --out runs/ssa_tiny

Real run (local folders; nothing is downloaded):

    .venv/bin/python pipelines/sample_score_audio.py --model /models/audioldm2 \\
        --prompts prompts.txt --num-samples 4 --perturb 2 --clap /models/clap-htsat-unfused \\
        --set num_inference_steps=100 --set guidance_scale=3.5 --set audio_length_in_s=10.24 \\
        --margin 0.05 --out runs/audioldm2_pairs

Every step is a `mmalign` command run in-process and is resumable (rerun the same line). Then:

    mmalign train configs/audio/dpo_audioalpaca.yaml data.train=OUT/pairs/pairs.jsonl data.format=audio_pairs
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
from pathlib import Path

from mmalign.cli import main as mmalign
from mmalign.generate.manifest import read_manifest, write_manifest
from mmalign.generate.prompts import prompt_text, read_prompts

ROOT = Path(__file__).resolve().parents[1]
SPLIT = re.compile(r"\s*,\s*(?:and\s+|then\s+)?|\s+(?:and|then|while|with)\s+", re.IGNORECASE)
TINY_PROMPTS = ["a dog barks, then a car passes", "rain falls on a tin roof and thunder rumbles",
                "birds sing while wind blows through trees", "a bell rings twice"]


def concepts(prompt: str) -> list[str]:
    """The prompt's concepts: its pieces between commas and joining words."""
    return [p.strip(" .") for p in SPLIT.split(prompt) if p and p.strip(" .")]


def perturbations(prompt: str, count: int, seed: int) -> list[str]:
    """Up to `count` distinct variants of `prompt` (never the prompt itself): one concept removed,
    or the concepts reordered; a prompt with one concept has none. Deterministic in (prompt, seed)."""
    parts = concepts(prompt)
    if len(parts) < 2 or count <= 0:
        return []
    removed = [", ".join(parts[:i] + parts[i + 1:]) for i in range(len(parts))]
    reordered = [", ".join(p) for p in itertools.islice(itertools.permutations(parts), 1, 24)]
    original = ", ".join(parts)
    options = list(dict.fromkeys(v for v in removed + reordered if v != original and v != prompt))
    random.Random(f"{seed}:{prompt}").shuffle(options)
    return options[:count]


def run(*argv: str) -> None:
    print("$ mmalign " + " ".join(argv), flush=True)
    if mmalign(list(argv)) != 0:
        sys.exit(f"step failed: mmalign {' '.join(argv)}")


def write_generation_prompts(prompts: list[str], perturb: int, seed: int, out: Path) -> Path:
    """OUT/prompts_generate.jsonl: each prompt, then its variants; "id" is the original's index."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, prompt in enumerate(prompts):
        for variant in [prompt, *perturbations(prompt, perturb, seed)]:
            lines.append(json.dumps({"id": str(i), "prompt": variant}, ensure_ascii=False))
    target = out / "prompts_generate.jsonl"
    target.write_text("\n".join(lines) + "\n")
    return target


def pool_by_original(samples: Path, prompts: list[str]) -> Path:
    """samples/pooled.jsonl: the generation manifest with every clip filed under its ORIGINAL
    prompt (prompt_index, prompt, sample renumbered; `generated_from` keeps the variant), so
    scoring and pairing see N·(1 + perturb) candidates per prompt. Rebuilt from the manifest."""
    rows = sorted(read_manifest(samples), key=lambda r: r["id"])
    counts: dict[int, int] = {}
    pooled = []
    for row in rows:
        original = int(row["prompt_id"])
        sample = counts.get(original, 0)
        counts[original] = sample + 1
        pooled.append({**row, "prompt_index": original, "prompt": prompts[original], "sample": sample,
                       "generated_from": row["prompt"]})
    target = samples / "pooled.jsonl"
    write_manifest(pooled, target)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: samples/, pairs/, report.html")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny AudioLDM2 + tiny CLAP written to OUT")
    p.add_argument("--model", help="local AudioLDM2 (diffusers) pipeline folder")
    p.add_argument("--clap", help="local CLAP folder (ClapModel + ClapProcessor, e.g. laion/clap-htsat-unfused)")
    p.add_argument("--prompts", help="prompt file (.txt, .jsonl, .csv/.tsv)")
    p.add_argument("--num-prompts", type=int, default=0, help="use the first K prompts (0: all)")
    p.add_argument("--num-samples", type=int, default=4, help="clips per prompt and per variant")
    p.add_argument("--perturb", type=int, default=2, help="perturbed variants per prompt (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="sampling parameter (generate --set)")
    p.add_argument("--margin", type=float, default=0.0, help="minimum CLAP gap of a pair")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    out = Path(args.out)
    if args.tiny:
        from mmalign.toyaudio import save_tiny_audioldm2, save_tiny_clap

        if not (out / "tiny_pipeline" / "model_index.json").is_file():
            save_tiny_audioldm2(out / "tiny_pipeline")
            save_tiny_clap(out / "tiny_clap")
        args.model, args.clap = args.model or str(out / "tiny_pipeline"), args.clap or str(out / "tiny_clap")
        args.num_samples, args.set = min(args.num_samples, 2), args.set or ["num_inference_steps=2"]
        prompts = TINY_PROMPTS
    else:
        if not (args.model and args.clap and args.prompts):
            p.error("give --model, --clap and --prompts (or --tiny)")
        prompts = [prompt_text(r["prompt"]) for r in read_prompts(args.prompts)]
    prompts = prompts[: args.num_prompts or None]
    samples, pairs, report = out / "samples", out / "pairs", out / "report.html"
    generation = write_generation_prompts(prompts, args.perturb, args.seed, out)
    run("generate", "--model", args.model, "--kind", "audio", "--prompts", str(generation), "--out", str(samples),
        "--num-samples", str(args.num_samples), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
        *sum((["--set", s] for s in args.set), []))
    pooled = pool_by_original(samples, prompts)
    run("score", str(pooled), "--scorer", f"clap={args.clap}")
    run("build-pairs", "scores", str(pooled), "--out", str(pairs), "--strategy", "best_worst",
        "--margin", str(args.margin))
    run("report", str(pooled), "--pairs", str(pairs / "pairs.jsonl"), "--out", str(report))
    config = ("configs/tiny/audio_dpo.yaml model.path=" + args.model if args.tiny
              else "configs/audio/dpo_audioalpaca.yaml model.path=" + args.model)
    print(f"\nnext: mmalign train {config} data.train={pairs / 'pairs.jsonl'} data.format=audio_pairs")


if __name__ == "__main__":
    main()
