"""`mmalign build-pairs existence`: yes/no object-existence pairs from COCO-format annotations.

A hallucination injected into a short answer: for "Is there a cup in the image?" the chosen
answer is the annotation's ("Yes" when a cup is annotated, else "No"), the rejected one its
opposite. The questions are sampled as POPE samples them (`mmalign.evaluation.pope.build_questions`:
per image K present objects, each followed by one absent object drawn at random, among the most
popular, or among the objects that co-occur most with it — `adversarial`), so a model learns to
deny exactly the objects its training captions taught it to expect. Build them from TRAINING
images (COCO train2014 for LLaVA): the POPE benchmark asks about val2014, and an evaluation set
must not see its own images. Caption pairs alone (`inject`, `corrupt`) do not train short
answers; mixing these in keeps yes/no answering from drifting while captions are aligned (as
LRV-Instruction's negative instructions and HA-DPO's mixed pairs do).

Output rows: {"images": [path relative to --out], "prompt", "chosen", "rejected", "object",
"label", "setting"}.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from mmalign.errors import DataError


def build_existence_pairs(objects_by_image: Mapping[str, Iterable[str]], *, setting: str = "adversarial",
                          num_images: int = 1000, per_image: int = 1, seed: int = 0, suffix: str = "",
                          yes: str = "Yes", no: str = "No") -> list[dict[str, Any]]:
    """One pair per POPE-style question on `num_images` images (file name -> annotated objects):
    prompt = question + `suffix`, chosen = the true answer, rejected = the other one."""
    from mmalign.evaluation.pope import build_questions, question_object

    if yes.strip().lower() == no.strip().lower():
        raise DataError(f"build-pairs existence: the yes answer {yes!r} and the no answer {no!r} are the same")
    questions = build_questions(objects_by_image, setting, num_images, seed=seed, per_image=per_image)
    pairs = []
    for q in questions:
        truth, lie = (yes, no) if q["label"] == "yes" else (no, yes)
        pairs.append({"images": [q["image"]], "prompt": q["text"] + suffix, "chosen": truth, "rejected": lie,
                      "object": question_object(q["text"]), "label": q["label"], "setting": setting})
    return pairs


def run(args: argparse.Namespace) -> int:
    from mmalign.evaluation.coco import load_instances
    from mmalign.io import write_jsonl_atomic

    out = Path(args.out)
    files, objects = load_instances(args.annotations)
    root = Path(args.images)
    by_file = {files[i]: objs for i, objs in objects.items() if (root / files[i]).is_file()}
    if not by_file:
        raise DataError(f"build-pairs existence: no image of {args.annotations} is in {root}")
    pairs = build_existence_pairs(by_file, setting=args.setting, num_images=args.num_images,
                                  per_image=args.per_image, seed=args.seed, suffix=args.suffix,
                                  yes=args.yes, no=args.no)
    for p in pairs:  # image paths relative to the output file, as every pair file has them
        p["images"] = [os.path.relpath((root / p["images"][0]).resolve(), out.parent.resolve())]
    write_jsonl_atomic(out, pairs)
    yes_share = sum(p["label"] == "yes" for p in pairs) / len(pairs)
    print(f"[mmalign] build-pairs existence: {len(pairs)} pairs ({args.setting}, yes {yes_share:.0%}) "
          f"from {len({p['images'][0] for p in pairs})} images; wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mmalign.evaluation.pope import SETTINGS

    p = sub.add_parser("existence", help="yes/no object-existence pairs (POPE-style questions) from annotations",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="COCO-format instances json (training images)")
    p.add_argument("--images", required=True, help="image folder of --annotations")
    p.add_argument("--out", required=True, help="output pairs jsonl (image paths relative to it)")
    p.add_argument("--setting", choices=SETTINGS, default="adversarial", help="how absent objects are drawn")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--per-image", type=int, default=1, help="present objects asked per image (as many absent)")
    p.add_argument("--suffix", default="", help="appended to each question (LLaVA-1.5: the POPE suffix)")
    p.add_argument("--yes", default="Yes", help="the answer text for yes")
    p.add_argument("--no", default="No", help="the answer text for no")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
