"""`mmalign build-pairs onpolicy`: VLM pairs from the policy's OWN answers (RLAIF-V / OPA-DPO
style, METHODS.md §4): sample N answers per prompt, score each for hallucination, pair the
least hallucinated (chosen) with the most hallucinated (rejected).

Scoring with annotations: each input record lists the objects in its image (`--objects-column`,
default `objects`: category names of the vocabulary). An answer's hallucinated objects are the
objects it mentions (`ObjectVocabulary.objects`, the CHAIR extraction) that are not in the image;
fewer is better, ties broken by recall (mentioned ∩ present / present, higher is better).
Library callers may pass `score(record, answer) -> (hallucinations, recall)` instead (e.g. a
judge). Prompts whose best and worst answers score the same are dropped and counted ("ties").
Empty answers are not scored; prompts with fewer than 2 non-empty answers are dropped ("empty").
Sampling is seeded per (prompt, sample), so a rerun gives the same answers. Output: the common
VLM format (`<out>/<name>.jsonl`, images relative to it) + provenance: the scores, the
hallucinated objects, the sample seeds, the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

from mmalign.builders.corrupt import add_model_builder_args, image_refs, load_builder_inputs, write_vlm_pairs
from mmalign.data.media import record_images
from mmalign.errors import DataError
from mmalign.seeds import RUN, STEP, mix_seed

Score = Callable[[dict[str, Any], str], tuple[float, float]]


def sample_seed(seed: int, index: int, sample: int) -> int:
    return mix_seed(seed, index, sample, strides=(RUN, STEP, 1))


def hallucination_score(vocab: Any, present: set[str], answer: str) -> tuple[list[str], float]:
    """(hallucinated objects, sorted; recall of the present objects) of one answer."""
    mentioned = vocab.objects(answer)
    recall = len(mentioned & present) / len(present) if present else 1.0
    return sorted(mentioned - present), recall


def annotation_scorer(vocab: Any, column: str = "objects") -> Score:
    """score(record, answer) -> (number of hallucinated objects, recall) from `record[column]`."""
    def score(record: dict[str, Any], answer: str) -> tuple[float, float]:
        if column not in record:
            raise DataError(f"row {record.get('_index', '?')} has no {column!r} annotation (objects in the image)")
        present = {str(o).lower() for o in record[column]}
        unknown = sorted(o for o in present if o not in vocab)
        if unknown:
            raise DataError(f"row {record.get('_index', '?')}: objects {unknown} are not vocabulary categories")
        hallucinated, recall = hallucination_score(vocab, present, answer)
        return float(len(hallucinated)), recall

    return score


def pick_pair(scores: list[tuple[float, float]]) -> tuple[int, int] | None:
    """(best, worst) sample positions: fewest hallucinations, then highest recall; None on a tie."""
    key = lambda k: (scores[k][0], -scores[k][1])  # noqa: E731
    order = sorted(range(len(scores)), key=key)
    best, worst = order[0], order[-1]
    return None if key(best) == key(worst) else (best, worst)


def build_onpolicy_pairs(model: Any, processor: Any, records: list[dict[str, Any]], out_dir: str | Path, *,
                         score: Score, num_samples: int = 4, temperature: float = 1.0, top_p: float = 1.0,
                         seed: int = 0, roots: Sequence[str | Path] = (), name: str = "pairs",
                         max_new_tokens: int = 64, batch_size: int = 8, model_name: str = "",
                         vocab: Any = None, objects_column: str = "objects") -> tuple[Path, dict[str, int]]:
    """Write the pairs (see the module docstring); returns (jsonl path, counts). With `vocab`, the
    hallucinated objects of both answers (from `record[objects_column]`) are recorded too."""
    from mmalign.generate.text import generate_answers

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    roots, out_dir = [Path(r) for r in roots], Path(out_dir)
    prompts = [{"prompt": r["prompt"], "images": record_images(r)} for r in records for _ in range(num_samples)]
    seeds = [sample_seed(seed, i, k) for i in range(len(records)) for k in range(num_samples)]
    answers = generate_answers(model, processor, prompts, max_new_tokens=max_new_tokens, do_sample=True,
                               temperature=temperature, top_p=top_p, seeds=seeds, batch_size=batch_size,
                               roots=roots, progress=True)
    counts = {"prompts": len(records), "kept": 0, "ties": 0, "empty": 0}
    pairs = []
    for i, r in enumerate(records):
        mine = answers[i * num_samples:(i + 1) * num_samples]
        usable = [k for k, a in enumerate(mine) if a.strip()]  # an empty answer is no answer
        if len(usable) < 2:
            counts["empty"] += 1
            continue
        scored = {k: score(dict(r, _index=i), mine[k]) for k in usable}
        picked = pick_pair([scored[k] for k in usable])
        if picked is None:
            counts["ties"] += 1
            continue
        b, w = usable[picked[0]], usable[picked[1]]
        pair = {"images": image_refs(r, i, roots, out_dir, name), "prompt": r["prompt"], "chosen": mine[b],
                "rejected": mine[w], "source_index": i, "method": "onpolicy",
                "hallucinations": [scored[b][0], scored[w][0]], "recall": [scored[b][1], scored[w][1]],
                "seeds": [seeds[i * num_samples + b], seeds[i * num_samples + w]], "num_samples": num_samples,
                "model": model_name}
        if vocab is not None:
            present = {str(o).lower() for o in r.get(objects_column, [])}
            pair["hallucinated_objects"] = [hallucination_score(vocab, present, a)[0] for a in (mine[b], mine[w])]
        pairs.append(pair)
    counts["kept"] = len(pairs)
    return write_vlm_pairs(pairs, out_dir, name), counts


def run(args: argparse.Namespace) -> int:
    from mmalign.evaluation.objects import ObjectVocabulary

    vocab = ObjectVocabulary.load(args.vocabulary)
    records, roots, model, processor = load_builder_inputs(args)
    path, c = build_onpolicy_pairs(model, processor, records, args.out,
                                   score=annotation_scorer(vocab, args.objects_column), num_samples=args.num_samples,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                   roots=roots, name=args.name,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   model_name=str(args.model), vocab=vocab, objects_column=args.objects_column)
    print(f"[mmalign] build-pairs onpolicy: {c['kept']} pairs kept of {c['prompts']} prompts "
          f"({c['ties']} dropped: best and worst answers tied, {c['empty']} dropped: fewer than 2 non-empty "
          f"answers); wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("onpolicy", help="least vs most hallucinated of the model's own sampled answers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_builder_args(p, "records with images, a prompt and the image's objects (jsonl, json, parquet)")
    p.add_argument("--objects-column", default="objects", help="column listing the objects present in the image")
    p.add_argument("--vocabulary", default=None, help="object vocabulary file (default: the 80 COCO categories)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(func=run)
