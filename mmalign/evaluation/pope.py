"""POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models")
and `mmalign eval pope`.

Questions are "Is there a/an OBJECT in the image?" with label "yes" or "no". The official
files (jsonl lines {"question_id", "image", "text", "label"}, one per setting) are read as
they are. `build_questions` makes new sets from any COCO-format annotations as the paper
does: images with at least `per_image` objects; for each image `per_image` present objects
(yes), each followed by one absent object (no) chosen

    random       uniformly among the objects of the annotation set,
    popular      as the most frequent object (images holding it) not yet used,
    adversarial  as the object co-occurring most often with that yes-object, not yet used

(absent from the image in every case; ties broken by name; when a ranked list runs out, a
random absent object). Answers are read by one of two parsers (`parse_answer`):

    official  POPE's `evaluate.py` rule, character for character: keep the text before the
              first "." (when there is one), delete commas, split on single spaces; the answer
              is "no" when a piece is exactly "No", "no" or "not", else "yes". So "No." and
              "No, there is not" are no, but "NO", "No!", "(No)", "**No**", "No" followed
              by a line break and more text, and "There isn't" are read as yes (published
              POPE numbers use this rule);
    lenient   "no" when the first sentence (text before the first ".") holds the word no or
              not in any case, words being runs of letters ("NO", "No!", "(No)", "**No**" are
              no; "isn't" is not, as its letters are "isn" and "t").

Metrics take "yes" as the positive class:

    accuracy = (TP + TN) / N   precision = TP / (TP + FP)   recall = TP / (TP + FN)
    F1 = 2 P R / (P + R)       yes_ratio = predicted yes / N
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mmalign.errors import DataError

SETTINGS = ("random", "popular", "adversarial")
DEFAULT_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's POPE prompt
_QUESTION = re.compile(r"^is there an? (.+?) in the image\??$", re.IGNORECASE)


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an official POPE question file (jsonl, whatever its suffix), unchanged; a row
    without question_id / image / text, or whose label is not yes/no, is a `DataError`."""
    from mmalign.evaluation.coco import read_jsonl

    rows = read_jsonl(path, "POPE questions")
    seen = set()
    for n, row in enumerate(rows, 1):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in row]
        if missing:
            raise DataError(f"{path}: row {n} has no {', '.join(missing)}")
        if str(row["label"]).strip().lower() not in ("yes", "no"):
            raise DataError(f"{path}: row {n} label {row['label']!r} is not 'yes' or 'no'")
        if row["question_id"] in seen:
            raise DataError(f"{path}: row {n} repeats question_id {row['question_id']!r}")
        seen.add(row["question_id"])
    if not rows:
        raise DataError(f"{path}: no questions")
    return rows


def question_object(text: str) -> str | None:
    """The object a POPE question asks about ("Is there a dining table in the image?")."""
    m = _QUESTION.match(text.strip())
    return m.group(1).lower() if m else None


PARSERS = ("official", "lenient")


def parse_answer(text: str, parser: str = "official") -> str:
    """'yes' or 'no' for a free-form answer, by the `official` POPE rule (evaluate.py: first
    sentence, commas deleted, split on " ", "no" iff a piece is "No" / "no" / "not") or the
    `lenient` one (any-case word no/not in the first sentence); see the module docstring."""
    if parser == "official":
        if text.find(".") != -1:
            text = text.split(".")[0]
        pieces = text.replace(",", "").split(" ")
        return "no" if "No" in pieces or "not" in pieces or "no" in pieces else "yes"
    if parser == "lenient":
        first = text.split(".")[0]
        return "no" if {"no", "not"} & set(re.findall(r"[a-z]+", first.lower())) else "yes"
    raise DataError(f"POPE answer parser {parser!r} is not one of {PARSERS}")


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (positive = yes) and yes-ratio of yes/no predictions."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    pairs = [(p.strip().lower(), g.strip().lower()) for p, g in zip(predictions, labels)]
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}}


def question_text(obj: str) -> str:
    return f"Is there {'an' if obj[:1] in 'aeiou' else 'a'} {obj} in the image?"


def _ranked_negatives(setting: str, positive: str, frequency: Mapping[str, int],
                      co: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Candidate absent objects in order of preference for one yes-object (popular / adversarial)."""
    if setting == "popular":
        return sorted(frequency, key=lambda o: (-frequency[o], o))
    partners = co.get(positive, {})
    return sorted(partners, key=lambda o: (-partners[o], o))


def build_questions(objects_by_image: Mapping[str, Iterable[str]], setting: str, num_images: int,
                    seed: int = 0, per_image: int = 3, universe: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """A POPE question set: `num_images` images (file name -> objects) with >= `per_image`
    objects, drawn with `seed`; 2 × per_image questions each, yes/no alternating (see module
    docstring for the negative sampling). `universe`: objects that may be asked about
    (default: every object of the annotations)."""
    from mmalign.evaluation.coco import object_statistics

    if setting not in SETTINGS:
        raise DataError(f"POPE setting {setting!r} is not one of {SETTINGS}")
    images = {im: sorted(set(objs)) for im, objs in objects_by_image.items()}
    frequency, co = object_statistics(images.values())
    universe = sorted(set(universe) | set(frequency)) if universe is not None else sorted(frequency)
    eligible = sorted(im for im, objs in images.items() if len(objs) >= per_image)
    if not eligible:
        raise DataError(f"POPE: no image has {per_image} or more annotated objects")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(eligible, min(num_images, len(eligible))))
    questions: list[dict[str, Any]] = []
    for image in chosen:
        present = set(images[image])
        used: set[str] = set()
        for positive in rng.sample(images[image], per_image):
            used.add(positive)
            ranked = [] if setting == "random" else _ranked_negatives(setting, positive, frequency, co)
            negative = next((o for o in ranked if o not in present and o not in used), None)
            if negative is None:
                pool = [o for o in universe if o not in present and o not in used]
                if not pool:
                    raise DataError(f"POPE: image {image} leaves no absent object to ask about")
                negative = rng.choice(pool)
            used.add(negative)
            for obj, label in ((positive, "yes"), (negative, "no")):
                questions.append({"question_id": len(questions) + 1, "image": image,
                                  "text": question_text(obj), "label": label})
    return questions


# -- mmalign eval pope ---------------------------------------------------------------------
def score(questions: list[dict[str, Any]], answers: Mapping[str, str], parser: str = "official") -> dict[str, Any]:
    """Metrics of one question set given {str(question_id): answer text}, answers read by `parser`."""
    missing = [q["question_id"] for q in questions if str(q["question_id"]) not in answers]
    if missing:
        raise DataError(f"no answer for {len(missing)} questions (first: question_id {missing[0]!r})")
    preds = [parse_answer(answers[str(q["question_id"])], parser) for q in questions]
    result = pope_metrics(preds, [str(q["label"]) for q in questions])
    result["answers"] = [{"question_id": q["question_id"], "image": q["image"], "text": q["text"],
                          "label": q["label"], "answer": answers[str(q["question_id"])], "pred": p}
                         for q, p in zip(questions, preds)]
    return result


def _question_sets(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """{name: questions}: the given files, or sets built from --annotations."""
    if args.questions:
        return {Path(q).stem: load_questions(q) for q in args.questions}
    if not args.annotations:
        raise DataError("eval pope: give --questions FILE.jsonl ... or --annotations instances.json --setting ...")
    from mmalign.evaluation.coco import load_instances

    files, objects = load_instances(args.annotations)
    by_file = {files[i]: objs for i, objs in objects.items()}
    if args.images:  # only images that are there
        by_file = {f: o for f, o in by_file.items() if (Path(args.images) / f).is_file()}
    return {s: build_questions(by_file, s, args.num_images, args.seed, args.per_image) for s in args.setting}


def _answers(args: argparse.Namespace, sets: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    from mmalign.evaluation.coco import AnswerCache, generate_cached, load_vlm, read_jsonl

    if args.answers:
        if len(args.answers) != len(sets):
            raise DataError(f"eval pope: {len(args.answers)} --answers files for {len(sets)} question sets "
                            "(give one per set, in the same order)")
        out = {}
        for name, path in zip(sets, args.answers):
            rows = read_jsonl(path, "answers")
            bad = next((n for n, r in enumerate(rows, 1) if "question_id" not in r
                        or not isinstance(r.get("answer", r.get("text")), str)), None)
            if bad:
                raise DataError(f"{path}: line {bad} needs 'question_id' and 'answer' (or 'text')")
            out[name] = {str(r["question_id"]): r.get("answer", r.get("text")) for r in rows}
        return out
    if not args.model or not args.images:
        raise DataError("eval pope: give --model and --images to answer the questions, or --answers FILE.jsonl ...")
    model, processor = load_vlm(args.model, args.dtype, args.device)
    out = {}
    for name, questions in sets.items():
        settings = {"model": str(args.model), "suffix": args.suffix, "max_new_tokens": args.max_new_tokens,
                    "set": name, "seed": args.seed}
        cache = AnswerCache(Path(args.out).with_suffix(f".{name}.answers.jsonl") if args.out else None, settings)
        items = [(q["question_id"], {"prompt": q["text"] + args.suffix, "images": [q["image"]]}) for q in questions]
        out[name] = generate_cached(model, processor, items, cache, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size, roots=[Path(args.images)], desc=f"pope {name}")
    return out


def paper_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A set's metrics under the names POPE's tables use, in percent (1 decimal is what they print)."""
    return {"Accuracy": 100 * result["accuracy"], "Precision": 100 * result["precision"],
            "Recall": 100 * result["recall"], "F1": 100 * result["f1"], "Yes": 100 * result["yes_ratio"]}


def run(args: argparse.Namespace) -> int:
    from mmalign.evaluation.coco import write_results
    from mmalign.evaluation.results import eval_record

    sets = _question_sets(args)
    if args.limit is not None:
        sets = {k: v[:args.limit] for k, v in sets.items()}
    if args.write_questions:
        from mmalign.io import write_jsonl_atomic

        for name, questions in sets.items():
            write_jsonl_atomic(Path(args.write_questions) / f"pope_{name}.jsonl", questions)
    answers = _answers(args, sets)
    results = {name: score(questions, answers[name], args.parser) for name, questions in sets.items()}
    if args.out:
        write_results(args.out, eval_record("pope", {name: paper_metrics(r) for name, r in results.items()},
                                            args, {"sets": results}))
    parts = [f"{name} acc {r['accuracy']:.3f} P {r['precision']:.3f} R {r['recall']:.3f} F1 {r['f1']:.3f} "
             f"yes {r['yes_ratio']:.3f} (n {r['counts']['n']})" for name, r in results.items()]
    print("pope: " + " | ".join(parts) + (f" -> {args.out}" if args.out else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mmalign.evaluation.chair import add_model_arguments

    p = sub.add_parser("pope", help="POPE yes/no object probing: accuracy, precision, recall, F1, yes-ratio",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", nargs="+", help="official POPE question files (jsonl), one result each")
    p.add_argument("--annotations", help="COCO-format instances json to build question sets from")
    p.add_argument("--setting", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                   help="sets to build from --annotations (default: all three)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--per-image", type=int, default=3, help="yes-questions per image (as many no-questions)")
    p.add_argument("--write-questions", help="folder to save the built (or read) question sets in")
    p.add_argument("--answers", nargs="+", help="precomputed answers jsonl {question_id, answer | text}, "
                                                "one per question set: no model needed")
    p.add_argument("--suffix", default=DEFAULT_SUFFIX, help="appended to each question (default: LLaVA-1.5's)")
    p.add_argument("--limit", type=int, help="first N questions of each set")
    p.add_argument("--parser", choices=PARSERS, default="official",
                   help="how answers are read as yes/no: official = POPE's evaluate.py rule, exactly (quote this "
                        "against papers); lenient = any-case word no/not (reads 'NO', '(No)', '**No**' as no)")
    add_model_arguments(p, max_new_tokens=16)
    p.set_defaults(func=run)
