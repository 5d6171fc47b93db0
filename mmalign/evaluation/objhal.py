"""Object HalBench (RLHF-V / RLAIF-V protocol, Rohrbach CHAIR on COCO) and `mmalign eval objhal`.

The benchmark asks a model for detailed descriptions of 300 COCO-2014 images (diversified
instructions; the prompt file, e.g. RLAIF-V's `eval/data/obj_halbench_300_with_image.jsonl`,
is brought by the user). Ground truth of an image = its COCO instance categories ∪ the
categories its COCO reference captions mention (pass train+val 2014 merged, or the files
holding the prompt images). For each response the distinct object words (one per vocabulary
entry, as the official extraction lists each object once) are mapped to COCO categories; a
word whose category is not in the ground truth is hallucinated. As
`RLAIF-V/eval/eval_gpt_obj_halbench.py::CHAIR.compute_chair` and its summary script (×100):

    Response Hall (CHAIRs) = #responses with >= 1 hallucinated word / #responses with >= 1 COCO word
    Object Hall   (CHAIRi) = #hallucinated words / #COCO words
    Object Recall          = Σ |distinct correct categories| / Σ |ground-truth categories|
    Average Length         = mean number of space-separated words of a response

Answers are generated greedily (the official run uses beam search, 3 beams), one batch at a time,
cached beside --out (*.answers.jsonl) so a killed run resumes without regenerating.

DIFFERENCE FROM THE OFFICIAL SCORE: the official object extraction asks gpt-3.5-turbo-0613 for
the objects of (question, answer), then lemmatises them with spaCy. Here the objects come
from mmalign's rule-based CHAIR extractor (`--protocol corrected`, objects.py, or the
original CHAIR script's, `--protocol reference`): no API, deterministic, but the numbers are
not the published GPT-based ones; quote them as "Object HalBench (rule-based extraction)".
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmalign.errors import DataError
from mmalign.evaluation.coco import Extractor


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def distinct_mentions(text: str, vocab: Extractor) -> list[Any]:
    """Mentions of `text`, one per vocabulary entry (the first one; "dogs ... a dog" is one)."""
    seen, out = set(), []
    for m in vocab.extract(text):
        if m.synonym not in seen:
            seen.add(m.synonym)
            out.append(m)
    return out


def objhal(responses: Sequence[tuple[Any, str]], ground_truth: Mapping[Any, set[str]],
           vocab: Extractor) -> dict[str, Any]:
    """Object HalBench metrics (fractions, not ×100) of (image_id, response) pairs; see the
    module docstring. Returns {"CHAIRs", "CHAIRs_all", "CHAIRi", "recall", "avg_len", "counts",
    "responses": per response (image_id, mentioned, hallucinated, ground_truth)}."""
    c = dict(responses=0, responses_with_objects=0, hallucinated_responses=0, words=0, hallucinated_words=0,
             gt_objects=0, correct_objects=0, length=0)
    rows = []
    for image_id, text in responses:
        if image_id not in ground_truth:
            raise DataError(f"Object HalBench response for image {image_id!r}: the image has no COCO ground truth")
        truth = set(ground_truth[image_id])
        mentions = distinct_mentions(text, vocab)
        wrong = [m for m in mentions if m.category not in truth]
        c["responses"] += 1
        c["responses_with_objects"] += bool(mentions)
        c["hallucinated_responses"] += bool(wrong)
        c["words"] += len(mentions)
        c["hallucinated_words"] += len(wrong)
        c["gt_objects"] += len(truth)
        c["correct_objects"] += len({m.category for m in mentions} & truth)
        c["length"] += len(text.strip().split(" "))
        rows.append({"image_id": image_id, "answer": text, "mentioned": [m.category for m in mentions],
                     "hallucinated": [{"word": m.word, "category": m.category} for m in wrong],
                     "ground_truth": sorted(truth)})
    return {"CHAIRs": _ratio(c["hallucinated_responses"], c["responses_with_objects"]),
            "CHAIRs_all": _ratio(c["hallucinated_responses"], c["responses"]),
            "CHAIRi": _ratio(c["hallucinated_words"], c["words"]),
            "recall": _ratio(c["correct_objects"], c["gt_objects"]),
            "avg_len": _ratio(c["length"], c["responses"]), "counts": c, "responses": rows}


# -- mmalign eval objhal ---------------------------------------------------------------------------
def read_prompts(path: str | Path, files: Mapping[Any, str]) -> list[dict[str, Any]]:
    """Prompt rows -> [{"key", "image_id", "question", "image"}]. A row holds "image_id" (a COCO
    id of --annotations), "question" (or "prompt"), optionally "image" (a file name under
    --images; default the annotation's file name; RLAIF-V's base64 "image" field is ignored) and
    "question_id" (the cache key; default the line number)."""
    from mmalign.evaluation.coco import read_jsonl

    out = []
    for n, row in enumerate(read_jsonl(path, "Object HalBench prompts"), 1):
        question = next((row[k] for k in ("question", "prompt") if isinstance(row.get(k), str)), None)
        image_id = row.get("image_id")
        if isinstance(image_id, str) and image_id.isdigit():
            image_id = int(image_id)
        if question is None or image_id not in files:
            raise DataError(f"{path}: line {n} needs 'image_id' (an image of --annotations) and a 'question'")
        image = row.get("image") if isinstance(row.get("image"), str) and len(row["image"]) < 512 else files[image_id]
        out.append({"key": row.get("question_id", n), "image_id": image_id, "question": question, "image": image})
    return out


def read_answers(path: str | Path, prompts: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    """Precomputed answers jsonl, one row per prompt line in order ({"answer" | "text"}, as the
    official scorer reads them; a row's own "image_id" wins), "Assistant:" removed."""
    from mmalign.evaluation.coco import read_jsonl

    rows = read_jsonl(path, "Object HalBench answers")
    if len(rows) != len(prompts):
        raise DataError(f"{path}: {len(rows)} answers for {len(prompts)} prompts (one answer per prompt line)")
    out = []
    for n, (row, p) in enumerate(zip(rows, prompts), 1):
        text = next((row[k] for k in ("answer", "text") if isinstance(row.get(k), str)), None)
        if text is None:
            raise DataError(f"{path}: line {n} needs an 'answer' (or 'text')")
        image_id = int(row["image_id"]) if str(row.get("image_id", "")).isdigit() else p["image_id"]
        out.append((image_id, text.replace("Assistant:", "").strip()))
    return out


def _generate(args: argparse.Namespace, prompts: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    from mmalign.evaluation.coco import AnswerCache, generate_cached, load_vlm

    if not args.model or not args.images:
        raise DataError("eval objhal: give --model and --images to answer the prompts, or --answers FILE.jsonl")
    model, processor = load_vlm(args.model, args.dtype, args.device)
    settings = {"model": str(args.model), "max_new_tokens": args.max_new_tokens}
    cache = AnswerCache(Path(args.out).with_suffix(".answers.jsonl") if args.out else None, settings)
    items = [(p["key"], {"prompt": p["question"], "images": [p["image"]]}) for p in prompts]
    answers = generate_cached(model, processor, items, cache, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, roots=[Path(args.images)], desc="objhal answers")
    return [(p["image_id"], answers[str(p["key"])]) for p in prompts]


def run(args: argparse.Namespace) -> int:
    from mmalign.evaluation.chair import load_extractor
    from mmalign.evaluation.coco import ground_truth_objects, load_captions, load_instances, write_results
    from mmalign.evaluation.results import eval_record

    vocab = load_extractor(args)
    files, annotated = load_instances(args.annotations, vocab)
    prompts = read_prompts(args.questions, files)[:args.limit]
    responses = read_answers(args.answers, prompts) if args.answers else _generate(args, prompts)
    references = load_captions(args.captions) if args.captions else None
    truth = ground_truth_objects(annotated, references, vocab, ids={i for i, _ in responses})
    result = objhal(responses, truth, vocab)
    metrics = {"CHAIRs": 100 * result["CHAIRs"], "CHAIRi": 100 * result["CHAIRi"],
               "Recall": 100 * result["recall"], "Avg Len": result["avg_len"]}
    if args.out:
        write_results(args.out, eval_record("objhal", metrics, args,
                                            {**result, "extraction": f"rule-based ({args.protocol}), not GPT-3.5"}))
    c = result["counts"]
    print(f"objhal ({args.protocol} rule-based extraction, not the official GPT-3.5 one): {c['responses']} responses "
          f"({c['responses_with_objects']} with COCO objects): Response Hall (CHAIRs) {metrics['CHAIRs']:.2f} "
          f"Object Hall (CHAIRi) {metrics['CHAIRi']:.2f} Recall {metrics['Recall']:.2f}"
          + ("" if references else " (ground truth: instances only, give --captions)")
          + (f" -> {args.out}" if args.out else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mmalign.evaluation.chair import PROTOCOLS, add_model_arguments

    p = sub.add_parser("objhal", help="Object HalBench: response / object hallucination (CHAIRs, CHAIRi) and recall",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="prompt jsonl: rows {image_id, question, image?, question_id?}")
    p.add_argument("--annotations", required=True, help="COCO-format instances json holding the prompt images")
    p.add_argument("--captions", help="COCO-format reference captions json (their objects join the ground truth)")
    p.add_argument("--answers", help="precomputed answers jsonl {answer | text}, one per prompt line: no model needed")
    p.add_argument("--limit", type=int, help="first N prompts only")
    p.add_argument("--protocol", choices=PROTOCOLS, default="corrected",
                   help="rule-based object extraction: corrected (mmalign's, default) or reference (the original "
                        "CHAIR script's; needs --synonyms)")
    p.add_argument("--synonyms", help="--protocol reference: the original script's synonyms file")
    p.add_argument("--vocabulary", help="--protocol corrected: object word list (default: COCO)")
    add_model_arguments(p, max_new_tokens=512)
    p.set_defaults(func=run)
