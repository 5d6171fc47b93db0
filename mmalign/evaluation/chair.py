"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning") and
`mmalign eval chair`.

For an image, the ground-truth objects are its COCO instance annotations ∪ the objects its
reference captions mention (METHODS.md §4: without the captions, numbers are not comparable
with published ones). Every object mention of a generated caption (`ObjectVocabulary.extract`)
is hallucinated when its category is not in that set:

    CHAIR_i = hallucinated mentions / all mentions
    CHAIR_s = captions with >= 1 hallucinated mention / all captions
    recall  = Σ_images |mentioned ∩ ground truth| / Σ_images |ground truth|   (distinct objects)

Two extractions (`--protocol`), used for the generated captions and the reference captions alike:

    corrected  (default) mmalign's `ObjectVocabulary.extract`: the reference's rules plus fixes of
               its bugs (plurals "buses", "ties", "canoes"; "motor bike"; hyphenated compounds
               "hot-dog"; three-word names) and extra synonyms (objects.py);
    reference  the original script's extraction exactly, quirks included (chair_reference.py,
               needs its synonym file, --synonyms). Quote this one beside published CHAIR numbers.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any, Iterable, Mapping

from mmalign.errors import DataError
from mmalign.evaluation.chair_reference import ReferenceExtractor
from mmalign.evaluation.coco import Extractor
from mmalign.evaluation.objects import load_vocabulary

DEFAULT_PROMPT = "Describe the image."
PROTOCOLS = ("corrected", "reference")


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _caption_rows(captions: Mapping[Any, str] | Iterable[dict[str, Any]]) -> list[tuple[Any, str]]:
    if isinstance(captions, Mapping):
        return list(captions.items())
    rows = []
    for n, c in enumerate(captions):
        if "image_id" not in c or not isinstance(c.get("caption"), str):
            raise DataError(f"caption {n}: expected {{'image_id', 'caption'}}, got keys {sorted(c)}")
        rows.append((c["image_id"], c["caption"]))
    return rows


def chair(captions: Mapping[Any, str] | Iterable[dict[str, Any]], ground_truth: Mapping[Any, Iterable[str]],
          vocab: Extractor | None = None) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i and recall of `captions` ({image_id: caption} or [{"image_id", "caption"}])
    against `ground_truth` ({image_id: objects}, see `coco.ground_truth_objects`); mentions
    extracted by `vocab` (default: the shipped COCO vocabulary, `--protocol corrected`).

    Returns {"CHAIR_s", "CHAIR_i", "recall", "counts": {...}, "captions": [per caption:
    image_id, caption, mentioned (categories in order, repeats kept), hallucinated
    [{"word", "category"}], ground_truth (sorted)]}."""
    vocab = vocab or load_vocabulary()
    counts = dict(captions=0, hallucinated_captions=0, mentions=0, hallucinated_mentions=0,
                  gt_objects=0, gt_objects_mentioned=0)
    per_caption = []
    for image_id, text in _caption_rows(captions):
        if image_id not in ground_truth:
            raise DataError(f"caption of image {image_id!r}: the image has no ground truth")
        truth = set(ground_truth[image_id])
        mentions = vocab.extract(text)
        wrong = [m for m in mentions if m.category not in truth]
        counts["captions"] += 1
        counts["hallucinated_captions"] += bool(wrong)
        counts["mentions"] += len(mentions)
        counts["hallucinated_mentions"] += len(wrong)
        counts["gt_objects"] += len(truth)
        counts["gt_objects_mentioned"] += len(truth & {m.category for m in mentions})
        per_caption.append({"image_id": image_id, "caption": text, "mentioned": [m.category for m in mentions],
                            "hallucinated": [{"word": m.word, "category": m.category} for m in wrong],
                            "ground_truth": sorted(truth)})
    return {"CHAIR_s": _ratio(counts["hallucinated_captions"], counts["captions"]),
            "CHAIR_i": _ratio(counts["hallucinated_mentions"], counts["mentions"]),
            "recall": _ratio(counts["gt_objects_mentioned"], counts["gt_objects"]),
            "counts": counts, "captions": per_caption}


# -- mmalign eval chair -------------------------------------------------------------------
def select_images(files: Mapping[Any, str], images_dir: Path | None, limit: int | None, seed: int
                  ) -> tuple[list[Any], int]:
    """Image ids to caption: those whose file is in `images_dir` (all when None), in id order,
    or `limit` of them drawn with `seed`. Returns (ids, number missing from the folder)."""
    ids = sorted(files, key=lambda i: (type(i).__name__, i))
    present = [i for i in ids if images_dir is None or (images_dir / files[i]).is_file()]
    missing = len(ids) - len(present)
    if limit is not None and limit < len(present):
        chosen = set(random.Random(seed).sample(present, limit))
        present = [i for i in present if i in chosen]
    return present, missing


def read_answer_captions(path: Path, files: Mapping[Any, str]) -> dict[Any, str]:
    """Precomputed captions: jsonl rows {"image_id" | "image": file name, "caption" | "answer" | "text"}."""
    from mmalign.evaluation.coco import read_jsonl

    by_file = {Path(f).name: i for i, f in files.items()}
    out = {}
    for n, row in enumerate(read_jsonl(path, "answers"), 1):
        text = next((row[k] for k in ("caption", "answer", "text") if isinstance(row.get(k), str)), None)
        image_id = row["image_id"] if "image_id" in row else by_file.get(Path(str(row.get("image", ""))).name)
        if text is None or image_id is None:
            raise DataError(f"{path}: line {n} needs 'image_id' (or an 'image' file name listed in the "
                            "annotations) and a 'caption' (or 'answer' / 'text')")
        out[image_id] = text
    return out


def _captions(args: argparse.Namespace, files: dict[Any, str]) -> tuple[dict[Any, str], int]:
    """Captions to score (generated or read) and the number of annotated images skipped."""
    from mmalign.evaluation.coco import AnswerCache, generate_cached, load_vlm

    images_dir = Path(args.images) if args.images else None
    if args.answers:
        captions = read_answer_captions(Path(args.answers), files)
        if args.limit is not None:
            captions = dict(list(captions.items())[:args.limit])
        return captions, 0
    if not args.model or images_dir is None:
        raise DataError("eval chair: give --model and --images to generate captions, or --answers FILE.jsonl")
    ids, missing = select_images(files, images_dir, args.limit, args.seed)
    if not ids:
        raise DataError(f"eval chair: none of the {len(files)} annotated images is in {images_dir}")
    model, processor = load_vlm(args.model, args.dtype, args.device)
    settings = {"model": str(args.model), "prompt": args.prompt, "max_new_tokens": args.max_new_tokens}
    cache = AnswerCache(Path(args.out).with_suffix(".answers.jsonl") if args.out else None, settings)
    items = [(i, {"prompt": args.prompt, "images": [files[i]]}) for i in ids]
    answers = generate_cached(model, processor, items, cache, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, roots=[images_dir], desc="chair captions")
    return {i: answers[str(i)] for i in ids}, missing


def load_extractor(args: argparse.Namespace) -> Extractor:
    """The mention extractor `--protocol` names."""
    if args.protocol == "reference":
        if args.vocabulary:
            raise DataError("eval chair: --vocabulary is for --protocol corrected; the reference protocol "
                            "reads the original synonym file (--synonyms)")
        return ReferenceExtractor.load(args.synonyms)
    if args.synonyms:
        raise DataError("eval chair: --synonyms is for --protocol reference (use --vocabulary with corrected)")
    return load_vocabulary(args.vocabulary)


def run(args: argparse.Namespace) -> int:
    from mmalign.evaluation.coco import ground_truth_objects, load_captions, load_instances, write_results
    from mmalign.evaluation.results import eval_record

    vocab = load_extractor(args)
    files, annotated = load_instances(args.annotations, vocab)
    references = load_captions(args.captions) if args.captions else None
    captions, missing = _captions(args, files)
    truth = ground_truth_objects(annotated, references, vocab, ids=captions)
    result = chair(captions, truth, vocab)
    if args.out:
        metrics = {"CHAIR_s": 100 * result["CHAIR_s"], "CHAIR_i": 100 * result["CHAIR_i"],
                   "Recall": 100 * result["recall"]}
        write_results(args.out, eval_record("chair", metrics, args, result))
    c = result["counts"]
    print(f"chair ({args.protocol}): {c['captions']} captions ({missing} annotated images not in --images, skipped; "
          f"ground truth {'instances + captions' if references else 'instances only'}): "
          f"CHAIR_s {result['CHAIR_s']:.3f} CHAIR_i {result['CHAIR_i']:.3f} recall {result['recall']:.3f} "
          f"({c['hallucinated_mentions']}/{c['mentions']} mentions hallucinated)"
          + (f" -> {args.out}" if args.out else ""))
    return 0


def add_model_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Options shared by the model-running evals."""
    p.add_argument("--model", help="local image-text-to-text model folder (LLaVA family)")
    p.add_argument("--images", help="folder holding the images named by the annotations / questions")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results json (written atomically); generated answers are cached beside "
                                 "it (*.answers.jsonl) so a killed run resumes")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chair", help="CHAIR_s / CHAIR_i / recall of generated captions (COCO-format annotations)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="COCO-format instances json")
    p.add_argument("--captions", help="COCO-format reference captions json (adds their objects to the ground truth)")
    p.add_argument("--answers", help="precomputed captions jsonl {image_id | image, caption}: no model needed")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--limit", type=int, help="caption N images drawn with --seed (default: all)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="corrected",
                   help="mention extraction: corrected (mmalign's, default) or reference (the original CHAIR "
                        "script's, quirks included: quote it beside published numbers; needs --synonyms)")
    p.add_argument("--synonyms", help="--protocol reference: the original script's data/synonyms.txt")
    p.add_argument("--vocabulary", help="--protocol corrected: object word list, lines 'category, synonym, ...' "
                                        "(default: COCO)")
    add_model_arguments(p, max_new_tokens=512)
    p.set_defaults(func=run)
