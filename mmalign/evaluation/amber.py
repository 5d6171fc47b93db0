"""AMBER (Wang et al. 2023, "An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination
Evaluation") and `mmalign eval amber`, scored as the official `inference.py`
(junyangwang0410/AMBER @534babf) scores.

Data (not shipped; Apache-2.0): the `data/` folder of that repository (annotations.json,
relation.json, safe_words.txt, query/query_*.json); images: the AMBER_*.jpg zip linked from its
README. `--data` is that folder.

Generative task (type "generative": ids 1-1004 of the official file; `--suffix` goes on the
other queries only). Nouns of a response (`--nouns`) kept only if in the hallucination
vocabulary V = relation.json keys ∪ values. Per kept noun: a safe word (safe_words.txt) is
skipped but counted; an exact match to a truth object or one of its associations covers that
truth object (the first match in the order [associations of truth 1, 2, ...] + [truth words]);
otherwise an exact match to a hallu object (or its associations) marks it, then similarity >
0.8 to a hallu word marks it, then similarity > 0.8 to a truth word covers it; a noun covered by
none of these is hallucinated. With counters starting at 0.001 (data/metrics.txt), ×100, 1 decimal:

    CHAIR = Σ hallucinated nouns / Σ kept nouns         Cover = Σ covered truth objects / Σ truth objects
    Hal   = 100 − % responses with no hallucinated noun  Cog   = Σ marked hallu objects / Σ hallu objects

Similarity: the official script uses spaCy en_core_web_lg vectors (`--similarity spacy`, needs
spaCy and that model installed locally). The default `--similarity exact` counts only identical
words as similar: a noun of V that is a near-synonym of a truth word (but not listed as its
association) then counts as hallucinated, so CHAIR and Hal come out higher than the official
ones (Cover, Cog lower or equal): say so when quoting them.

Discriminative tasks (ids >= 1005): the response is compared by exact string to "Yes"/"No"
(`--answers-as-is`; by default answers are first normalised: first word, letters only, any
case, so "yes." -> "Yes", "No, there is" -> "No"; anything else is wrong and not a "No").
"No" is the positive class: Precision = #(answered No ∧ truth no) / #answered No,
Recall = #(answered No ∧ truth no) / #truth no, F1 = 2PR / (P + R + 1e-4) on P, R already
rounded to 1 decimal (1e-3 for existence, as the script), Accuracy; overall and per existence,
attribute (state, number, action; its denominators start at 0.003: three pooled counters),
relation.

AMBER score = (100 − CHAIR + F1) / 2 with the overall discriminative F1 (the paper's definition).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from mmalign.errors import DataError

Similar = Callable[[str, str], bool]
DIMENSIONS = {"existence": ("discriminative-hallucination",),
              "attribute": ("discriminative-attribute-state", "discriminative-attribute-number",
                            "discriminative-attribute-action"),
              "state": ("discriminative-attribute-state",), "number": ("discriminative-attribute-number",),
              "action": ("discriminative-attribute-action",), "relation": ("discriminative-relation", "relation")}
WHERE_TO_GET = "the data/ folder of the public junyangwang0410/AMBER repository (images: the zip its README links)"


def load_amber(data: str | Path) -> dict[str, Any]:
    """annotations (list, entry i has id i + 1), association {object: [words]}, safe words."""
    from mmalign.evaluation.coco import read_json

    data = Path(data)
    if not (data / "annotations.json").is_file():
        raise DataError(f"AMBER data not found: {data}/annotations.json (--data is {WHERE_TO_GET})")
    annotations = read_json(data / "annotations.json", "AMBER annotations")
    for n, a in enumerate(annotations):
        if a.get("id") != n + 1 or "type" not in a or "truth" not in a:
            raise DataError(f"{data}/annotations.json: entry {n} must be {{'id': {n + 1}, 'type', 'truth', ...}}")
    association = read_json(data / "relation.json", "AMBER relation.json")
    safe = (data / "safe_words.txt").read_text(encoding="utf-8").split("\n") if \
        (data / "safe_words.txt").is_file() else []
    return {"annotations": annotations, "association": association, "safe_words": [w for w in safe if w]}


def simple_nouns(text: str) -> list[str]:
    """Default noun extraction without NLTK's tagger: every token (NLTK-style tokenizer), the
    plural forms s/es/ies/people/men/women/children reduced as WordNet's noun lemmatiser does.
    Unlike the official tagger it keeps words used as verbs or adjectives ("a sign", "light
    blue"); only words in the hallucination vocabulary count anyway."""
    from mmalign.evaluation.reference_text import word_tokenize

    irregular = {"people": "people", "men": "man", "women": "woman", "children": "child", "feet": "foot",
                 "teeth": "tooth", "mice": "mouse", "geese": "goose", "leaves": "leaf", "knives": "knife"}
    out = []
    for tok in word_tokenize(text):
        if tok in irregular:
            tok = irregular[tok]
        elif tok.endswith("ies") and len(tok) > 4:
            tok = tok[:-3] + "y"
        elif tok.endswith(("ches", "shes", "sses", "xes")):
            tok = tok[:-2]
        elif tok.endswith("s") and not tok.endswith(("ss", "us", "is")) and len(tok) > 3:
            tok = tok[:-1]
        out.append(tok)
    return out


def nltk_nouns(text: str) -> list[str]:
    """The official extraction: nltk word_tokenize + pos_tag NN* + WordNet lemma (NLTK and its
    punkt, tagger and wordnet data must be installed locally)."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer

        lemmatizer = WordNetLemmatizer()
        return [lemmatizer.lemmatize(w) for w, pos in nltk.pos_tag(nltk.word_tokenize(text)) if pos.startswith("NN")]
    except (ImportError, LookupError) as e:
        raise DataError(f"--nouns nltk needs NLTK with its punkt, tagger and wordnet data installed locally "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e})") from e


def spacy_similarity(model: str = "en_core_web_lg", threshold: float = 0.8) -> Similar:
    """The official similarity: spaCy `nlp(a).similarity(nlp(b)) > threshold`, docs cached."""
    try:
        import spacy

        nlp, docs = spacy.load(model), {}
    except (ImportError, OSError) as e:
        raise DataError(f"--similarity spacy needs spaCy and its {model} model installed locally ({e})") from e

    def similar(a: str, b: str) -> bool:
        for w in (a, b):
            if w not in docs:
                docs[w] = nlp(w)
        return docs[a].similarity(docs[b]) > threshold
    return similar


def exact_similarity(a: str, b: str) -> bool:
    return a == b


def _mark(words: list[str], owners: list[int], n_assoc: int, j: int, marks: list[int]) -> None:
    """The script's index bookkeeping: word j of [associations...] + [objects...] marks its object."""
    marks[owners[j] if j < n_assoc else j - n_assoc] = 1


def _first(noun: str, words: list[str], similar: Similar) -> int | None:
    return next((j for j, w in enumerate(words) if similar(noun, w)), None)


def generative_case(nouns: Sequence[str], entry: dict[str, Any], association: dict[str, list[str]],
                    vocabulary: set[str], safe_words: set[str], similar: Similar) -> dict[str, Any]:
    """One response: kept nouns, hallucinated nouns, truth objects covered, hallu objects named."""
    kept = [n for n in nouns if n in vocabulary]
    truth, hallu = list(entry["truth"]), list(entry.get("hallu", []))
    t_owner = [k for k, w in enumerate(truth) for _ in association[w]]
    t_words = [a for w in truth for a in association[w]] + truth
    h_owner = [k for k, w in enumerate(hallu) for _ in association[w]]
    h_words = [a for w in hallu for a in association[w]] + hallu
    covered, named, hallucinated = [0] * len(truth), [0] * len(hallu), []
    for noun in kept:
        if noun in safe_words:
            continue
        if noun in t_words:
            _mark(t_words, t_owner, len(t_owner), t_words.index(noun), covered)
            continue
        if noun in h_words:
            _mark(h_words, h_owner, len(h_owner), h_words.index(noun), named)
        j = _first(noun, h_words, similar)
        if j is not None:
            _mark(h_words, h_owner, len(h_owner), j, named)
        j = _first(noun, t_words, similar)
        if j is not None:
            _mark(t_words, t_owner, len(t_owner), j, covered)
            continue
        hallucinated.append(noun)
    return {"nouns": kept, "hallucinated": hallucinated, "covered": sum(covered), "truth": len(truth),
            "named": sum(named), "hallu": len(hallu)}


def _pct(score: float, num: float) -> float:
    return round(score / num * 100, 1)


def generative_metrics(cases: Sequence[dict[str, Any]]) -> dict[str, float]:
    """CHAIR, Cover, Hal, Cog over `generative_case` results (counters start at 0.001, as the script's)."""
    return {"CHAIR": _pct(sum(len(c["hallucinated"]) for c in cases), 0.001 + sum(len(c["nouns"]) for c in cases)),
            "Cover": _pct(sum(c["covered"] for c in cases), 0.001 + sum(c["truth"] for c in cases)),
            "Hal": round(100 - sum(not c["hallucinated"] for c in cases) / (0.001 + len(cases)) * 100, 1),
            "Cog": _pct(sum(c["named"] for c in cases), 0.001 + sum(c["hallu"] for c in cases))}


def normalise_answer(text: str) -> str:
    """'Yes' / 'No' when the first word (letters only, any case) is yes / no, else the text."""
    first = re.findall(r"[A-Za-z]+", text.strip().split()[0]) if text.strip() else []
    word = first[0].lower() if first else ""
    return {"yes": "Yes", "no": "No"}.get(word, text)


def discriminative_metrics(rows: Sequence[tuple[str, str]], existence: bool = False,
                           start: float = 0.001) -> dict[str, float]:
    """Accuracy, Precision, Recall, F1 (×100, 1 decimal; 'No' positive) of (truth, response) pairs;
    denominators start at `start` (the script's attribute numbers pool three 0.001 counters)."""
    correct = sum((t == "yes" and r == "Yes") or (t == "no" and r == "No") for t, r in rows)
    truth_no = sum(t == "no" for t, _ in rows)
    said_no = sum(r == "No" for _, r in rows)
    both_no = sum(t == "no" and r == "No" for t, r in rows)
    p, r = _pct(both_no, start + said_no), _pct(both_no, start + truth_no)
    eps = 0.001 if existence else 0.0001
    return {"Accuracy": _pct(correct, start + len(rows)), "Precision": p, "Recall": r,
            "F1": round(2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + eps) * 100, 1)}


def amber_score(chair_value: float, f1: float) -> float:
    """AMBER = (100 − CHAIR + F1) / 2."""
    return (100 - chair_value + f1) / 2


def score(amber: dict[str, Any], responses: dict[int, str], nouns: Callable[[str], list[str]] = simple_nouns,
          similar: Similar = exact_similarity, as_is: bool = False) -> dict[str, Any]:
    """All AMBER metrics of {id: response} (any subset of the ids), as the official script prints them."""
    annotations, association = amber["annotations"], amber["association"]
    vocabulary = set(association) | {w for ws in association.values() for w in ws}
    safe = set(amber["safe_words"])
    cases, by_type = [], {}
    for i in sorted(responses):
        if not 1 <= i <= len(annotations):
            raise DataError(f"AMBER answer id {i} is not in annotations.json (1..{len(annotations)})")
        entry, text = annotations[i - 1], responses[i]
        if entry["type"] == "generative":
            cases.append({"id": i, **generative_case(nouns(text), entry, association, vocabulary, safe, similar)})
        else:
            by_type.setdefault(entry["type"], []).append((entry["truth"], text if as_is else normalise_answer(text)))
    metrics: dict[str, Any] = {}
    if cases:
        metrics.update(generative_metrics(cases))
    rows = [r for rs in by_type.values() for r in rs]
    if rows:
        metrics.update(discriminative_metrics(rows))
        for name, types in DIMENSIONS.items():
            part = [r for t in types for r in by_type.get(t, [])]
            if part:
                metrics[name] = discriminative_metrics(part, existence=name == "existence",
                                                       start=0.001 * (3 if name == "attribute" else 1))
    if cases and rows:
        metrics["AMBER"] = amber_score(metrics["CHAIR"], metrics["F1"])
    return {"metrics": metrics, "generative": cases,
            "counts": {"generative": len(cases), "discriminative": len(rows)}}


# -- mmalign eval amber --------------------------------------------------------------------------
def read_responses(path: str | Path) -> dict[int, str]:
    """The official inference_data json ([{"id", "response"}]) or jsonl rows {id, response | answer | text}."""
    from mmalign.evaluation.coco import read_json, read_jsonl

    path = Path(path)
    rows = read_jsonl(path, "AMBER answers") if path.suffix == ".jsonl" else read_json(path, "AMBER answers")
    out = {}
    for n, row in enumerate(rows, 1):
        text = next((row[k] for k in ("response", "answer", "text") if isinstance(row.get(k), str)), None)
        if not isinstance(row.get("id"), int) or text is None:
            raise DataError(f"{path}: row {n} needs an integer 'id' and a 'response'")
        out[row["id"]] = text
    return out


def _generate(args: argparse.Namespace, annotations: list[dict[str, Any]]) -> dict[int, str]:
    from mmalign.evaluation.coco import AnswerCache, generate_cached, load_vlm, read_json

    if not args.model or not args.images:
        raise DataError("eval amber: give --model and --images to answer the queries, or --answers FILE")
    path = Path(args.queries) if args.queries else Path(args.data) / "query" / "query_all.json"
    queries = read_json(path, "AMBER queries")
    if args.limit is not None:
        queries = queries[:args.limit]
    bad = next((n for n, q in enumerate(queries) if not isinstance(q.get("id"), int)
                or not 1 <= q["id"] <= len(annotations) or "query" not in q or "image" not in q), None)
    if bad is not None:
        raise DataError(f"{path}: query {bad} needs 'query', 'image' and an 'id' of annotations.json")
    model, processor = load_vlm(args.model, args.dtype, args.device)
    settings = {"model": str(args.model), "max_new_tokens": args.max_new_tokens, "suffix": args.suffix}
    cache = AnswerCache(Path(args.out).with_suffix(".answers.jsonl") if args.out else None, settings)
    suffix = {q["id"]: args.suffix if annotations[q["id"] - 1]["type"] != "generative" else "" for q in queries}
    items = [(q["id"], {"prompt": q["query"] + suffix[q["id"]], "images": [q["image"]]}) for q in queries]
    answers = generate_cached(model, processor, items, cache, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, roots=[Path(args.images)], desc="amber")
    return {q["id"]: answers[str(q["id"])] for q in queries}


def run(args: argparse.Namespace) -> int:
    from mmalign.evaluation.coco import write_results
    from mmalign.evaluation.results import eval_record

    amber = load_amber(args.data)
    responses = read_responses(args.answers) if args.answers else _generate(args, amber["annotations"])
    nouns = nltk_nouns if args.nouns == "nltk" else simple_nouns
    similar = spacy_similarity(args.spacy_model) if args.similarity == "spacy" else exact_similarity
    result = score(amber, responses, nouns, similar, as_is=args.answers_as_is)
    if args.out:
        write_results(args.out, eval_record("amber", result["metrics"], args,
                                            {k: v for k, v in result.items() if k != "metrics"}))
    m = result["metrics"]
    shown = " ".join(f"{k} {v:.1f}" for k, v in m.items() if isinstance(v, float))
    note = "" if args.similarity == "spacy" else " (similarity exact: not the official spaCy step, CHAIR/Hal higher)"
    print(f"amber: {result['counts']['generative']} generative, {result['counts']['discriminative']} "
          f"discriminative answers: {shown}{note}" + (f" -> {args.out}" if args.out else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mmalign.evaluation.chair import add_model_arguments

    p = sub.add_parser("amber", help="AMBER: generative CHAIR/Cover/Hal/Cog, discriminative Acc/P/R/F1, AMBER score",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help=f"AMBER's data/ folder: {WHERE_TO_GET}")
    p.add_argument("--answers", help="responses: the official inference json [{id, response}] or jsonl: no model")
    p.add_argument("--queries", help="query file to answer (default: DATA/query/query_all.json)")
    p.add_argument("--suffix", default="", help="appended to the discriminative (yes/no) queries")
    p.add_argument("--limit", type=int, help="first N queries only")
    p.add_argument("--nouns", choices=("simple", "nltk"), default="simple",
                   help="noun extraction: simple (tokens, plural reduced; default) or nltk (the official "
                        "pos_tag + WordNet lemma; needs NLTK and its data installed locally)")
    p.add_argument("--similarity", choices=("exact", "spacy"), default="exact",
                   help="exact (default: no word vectors; CHAIR/Hal come out higher than official) or spacy "
                        "(the official en_core_web_lg similarity > 0.8; needs spaCy and the model installed)")
    p.add_argument("--spacy-model", default="en_core_web_lg")
    p.add_argument("--answers-as-is", action="store_true",
                   help="compare discriminative responses to 'Yes'/'No' exactly (default: first word normalised)")
    add_model_arguments(p, max_new_tokens=256)
    p.set_defaults(func=run)
