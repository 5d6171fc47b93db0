"""On-policy VLM preference pairs: the policy answers each image prompt N times, a judge
compares its answers (pairwise, both orders; or pointwise 1-10), and the decided pairs become
{"images", "prompt", "chosen", "rejected"} records that `mmalign train` (modality llava) reads.
This is the loop of on-policy VLM DPO recipes (RLAIF-V, OPA-DPO): the pairs come from the
model being trained, so the preferences are about its own mistakes.

Real run (local folders; nothing is downloaded):

    .venv/bin/python pipelines/onpolicy_llava.py --model /models/llava-1.5-7b-hf \\
        --prompts my_prompts.jsonl --judge /models/llava-v1.6-34b-hf --num-samples 4 \\
        --set temperature=0.7 --set max_new_tokens=128 --out runs/llava_onpolicy

my_prompts.jsonl: {"prompt": "Describe the image.", "images": ["imgs/1.jpg"]} per line (image
paths relative to the file). Then:

    mmalign train configs/llava/<method>.yaml data.train=runs/llava_onpolicy/pairs/pairs.jsonl

Plumbing check on a CPU (seconds; a RANDOM-weight tiny LLaVA is both policy and judge, so its
"verdicts" do not parse and no pair is decided: the run shows every step and how the strict
judge counts unparsed answers, not preference data):

    .venv/bin/python pipelines/onpolicy_llava.py --tiny --out runs/llava_onpolicy_tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmalign.cli import main as mmalign


def run(*argv: str, allow_fail: bool = False) -> bool:
    print("$ mmalign " + " ".join(argv), flush=True)
    ok = mmalign(list(argv)) == 0
    if not ok and not allow_fail:
        sys.exit(f"step failed: mmalign {' '.join(argv)}")
    return ok


def tiny_inputs(out: Path) -> tuple[str, str]:
    """A random tiny LLaVA (mmalign.toyvlm) and 6 toy-shape image prompts, written under out/."""
    from mmalign.toyvlm import make_shape_pairs, save_tiny_llava

    model = out / "tiny_llava"
    if not (model / "config.json").exists():
        save_tiny_llava(model)
    shapes = make_shape_pairs(6, 0, out / "toy_shapes")
    prompts = out / "toy_shapes" / "prompts.jsonl"
    records = [json.loads(line) for line in shapes.read_text().splitlines()]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "images": r["images"]}) + "\n" for r in records))
    return str(model), str(prompts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: answers/, pairs/, report.html")
    p.add_argument("--tiny", action="store_true", help="CPU plumbing check with a random tiny LLaVA")
    p.add_argument("--model", help="policy VLM folder (LLaVA family)")
    p.add_argument("--prompts", help="jsonl of {prompt, images}")
    p.add_argument("--judge", help="judge model folder [,key=value...] (mmalign.scoring.judge); default: --model")
    p.add_argument("--mode", default="pairwise", choices=("pairwise", "pointwise"),
                   help="pairwise: A/B/tie in both orders (pairs = decided comparisons); "
                        "pointwise: 1-10 score, then best-vs-worst with --margin")
    p.add_argument("--margin", type=float, default=1.0, help="pointwise: minimum score gap (default 1 point)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="policy sampling (generate --set): temperature, top_p, max_new_tokens")
    p.add_argument("--device", default="cpu", help="judge device")
    args = p.parse_args()

    out = Path(args.out)
    if args.tiny:
        args.model, args.prompts = tiny_inputs(out)
        args.set = args.set or ["max_new_tokens=8"]
    if not args.model or not args.prompts:
        p.error("give --model and --prompts (or --tiny)")
    judge = args.judge or args.model
    answers, pairs, report = out / "answers", out / "pairs", out / "report.html"
    run("generate", "--model", args.model, "--prompts", args.prompts, "--out", str(answers), "--kind", "text",
        "--num-samples", str(args.num_samples), "--seed", str(args.seed), "--set", "do_sample=true",
        *sum((["--set", s] for s in args.set), []))
    if args.mode == "pairwise":
        ok = run("build-pairs", "scores", str(answers), "--out", str(pairs), "--strategy", "judge",
                 "--judge", judge, "--device", args.device, allow_fail=args.tiny)
    else:
        run("score", str(answers), "--scorer", f"judge={judge},mode=pointwise", "--device", args.device)
        ok = run("build-pairs", "scores", str(answers), "--out", str(pairs), "--margin", str(args.margin),
                 allow_fail=args.tiny)
    run("report", str(answers), *(["--pairs", str(pairs / "pairs.jsonl")] if ok else []), "--out", str(report))
    if ok:
        print(f"\nnext: mmalign train configs/tiny/llava_dpo.yaml model.path={args.model} "
              f"data.train={pairs / 'pairs.jsonl'}  (set data.eval too)")
    else:
        print("\nno pair was decided: a random tiny judge never answers in the strict verdict format "
              "(expected for --tiny); point --judge at an instruction-tuned VLM")


if __name__ == "__main__":
    main()
