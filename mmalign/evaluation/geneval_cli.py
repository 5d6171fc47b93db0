"""`mmalign eval geneval`: GenEval-style checks of generated images (rules: geneval.py; detectors:
geneval_detectors.py) and the `geneval`
scorer (mmalign/scoring/geneval.py).

Images in GenEval's layout (what its generation script writes): IMAGES/<prompt index>/metadata.jsonl
(the prompt's line of evaluation_metadata.jsonl) and IMAGES/<prompt index>/samples/<k>.png.
Per-image verdicts are cached beside --out (*.images.jsonl), so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mmalign.evaluation import geneval

DETECTORS = ("toyworld", "owlv2", "grounding-dino")


def evaluate_folder(items: list[tuple[str, Path, dict[str, Any]]], detector: Any, cache: Any,
                    thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Per-image rows {"file", "prompt_index", "tag", "prompt", "correct", "reasons", "detected"};
    rows already in `cache` (an AnswerCache of json rows) are not detected again."""
    from tqdm.auto import tqdm

    from mmalign.data.media import load_image

    rows = []
    for key, path, metadata in tqdm(items, desc="geneval", unit="image"):
        if key not in cache.done:
            checked = geneval.check_image(load_image(str(path), key), metadata, detector, **thresholds)
            cache.add([key], [json.dumps(checked)])
        rows.append({"file": key, "prompt_index": key.split("/")[0], "tag": metadata["tag"],
                     "prompt": metadata.get("prompt", ""), **json.loads(cache.done[key])})
    return rows


def run(args: argparse.Namespace) -> int:
    from mmalign.evaluation.coco import AnswerCache, write_results
    from mmalign.evaluation.geneval_detectors import load_detector
    from mmalign.evaluation.results import eval_record

    items = geneval.image_items(args.images)[:args.limit]
    thresholds = {"threshold": args.threshold, "counting_threshold": args.counting_threshold,
                  "max_objects": args.max_objects}
    settings = {"detector": args.detector, "detector_path": args.detector_path, "clip": args.clip, **thresholds}
    out = Path(args.out) if args.out else None
    cache = AnswerCache(out.with_suffix(".images.jsonl") if out else None, settings)
    detector = load_detector(args.detector, args.detector_path, args.clip, args.device or "cpu") \
        if any(k not in cache.done for k, _, _ in items) else None
    rows = evaluate_folder(items, detector, cache, thresholds)
    metrics = geneval.summary(rows)
    if out:
        write_results(out, eval_record("geneval", metrics, args, {"counts": {"images": len(rows)}, "images_checked": rows}))
    note = "" if args.detector == "toyworld" else f" (detector {args.detector}: GenEval-style, not GenEval's Mask2Former)"
    print(f"geneval: {len(rows)} images: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + note
          + (f" -> {out}" if out else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("geneval", help="GenEval-style object / count / colour / position checks of generated images",
                       description=geneval.__doc__ + "\n" + __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="GenEval layout: IMAGES/<index>/metadata.jsonl + samples/<k>.png")
    p.add_argument("--detector", choices=DETECTORS, required=True,
                   help="toyworld (exact, toy-world images), owlv2 (a transformers OWLv2 / OWL-ViT) or grounding-dino "
                        "(a transformers Grounding DINO); the last two from --detector-path")
    p.add_argument("--detector-path", help="local folder or hub id of the OWLv2 / OWL-ViT / Grounding DINO model")
    p.add_argument("--clip", help="local CLIP folder for the colour step (GenEval: ViT-L-14 openai)")
    p.add_argument("--threshold", type=float, default=geneval.THRESHOLD)
    p.add_argument("--counting-threshold", type=float, default=geneval.COUNTING_THRESHOLD)
    p.add_argument("--max-objects", type=int, default=geneval.MAX_OBJECTS)
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--device", default=None)
    p.add_argument("--out", help="results json; per-image verdicts cached beside it (*.images.jsonl)")
    p.set_defaults(func=run)
