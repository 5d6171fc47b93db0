"""Hallucination injection pairs (POVID stage 1, HA-DPO; METHODS.md §4) and
`mmalign build-pairs inject`.

chosen = a ground-truth caption or answer; rejected = the same text with one error injected,
keeping its words, style and (nearly) its length, so a model learns content, not style:

- object: an object absent from the image, chosen `random`ly, among the `popular` (most
  frequent in the data) or the `co-occurring` ones (most often seen with the present
  objects: the "adversarial" choice), inserted in the caption's own list style ("a red
  circle and a blue square" -> "... and a green triangle": a colour when every object has one;
  "a cat, a dog and a bird" -> "a cat, a dog, a bird and a car"; "a man riding a horse on
  a beach" -> "... a horse and a dog on a beach"), or (`object_mode="replace"`) put in place
  of a mentioned object, plural kept ("two dogs" -> "two cats");
- attribute: a colour, count or size word swapped ("red" -> "blue", "two" -> "four",
  "large" -> "small");
- relation: a spatial word swapped (left <-> right, above <-> below, on <-> under,
  in front of <-> behind, inside <-> outside ...).

The present objects of a record are the `objects` of its image (e.g. from COCO instance
annotations) ∪ the objects mentioned by every text of that image. Every pair is validated
with the extractor: an object pair's rejected text mentions exactly the chosen's objects +
the injected one (minus the replaced one); attribute and relation pairs leave the objects
unchanged. A record where no
requested kind applies is dropped and counted. An optional `rewriter` (a local instruction
model, `LocalRewriter`) rewrites object pairs more fluently; its text is kept only if it
passes the same validation and stays within `max_length_ratio` of the chosen length,
otherwise the rule-based text is kept and the fallback counted.
"""

from __future__ import annotations

import argparse
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mmalign.data.media import record_images
from mmalign.errors import DataError
from mmalign.evaluation.objects import Mention, ObjectVocabulary, load_vocabulary, plural_of, words

KINDS = ("object", "attribute", "relation")
STRATEGIES = ("random", "popular", "co-occurring")
TEXT_KEYS = ("chosen", "caption", "answer", "text")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "pink", "purple", "gray", "orange")
COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIZES = {"large": "small", "small": "large", "big": "small", "little": "big", "tall": "short",
         "short": "tall", "huge": "tiny", "tiny": "huge"}
RELATIONS = {"left": "right", "right": "left", "above": "below", "below": "above", "on top of": "underneath",
             "underneath": "on top of", "on": "under", "under": "on", "beneath": "above", "over": "under",
             "in front of": "behind", "behind": "in front of", "inside": "outside", "outside": "inside",
             "top": "bottom", "bottom": "top"}
# Words after which " and a X" can follow an object mention directly (else: at the clause end).
BOUNDARY = {"with", "on", "in", "at", "near", "next", "by", "under", "above", "below", "behind", "beside",
            "and", "or", "that", "which", "while", "is", "are", "sitting", "standing", "lying", "of",
            "to", "from", "inside", "outside", "over", "for", "as", "who", "being", "holding", "looking"}
Rewriter = Callable[[list[tuple[str, str]]], list[str]]  # [(chosen, injected object)] -> rewrites


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _fix_article(text: str, start: int, new_word: str) -> str:
    """Make an "a"/"an" right before `start` agree with `new_word` (which begins at `start`)."""
    m = re.search(r"\b(a|an|A|An)(\s+)$", text[:start])
    if not m:
        return text
    art = article(new_word)
    art = art.capitalize() if m.group(1)[0].isupper() else art
    return text[:m.start(1)] + art + text[m.end(1):]


def _free_spans(text: str, mentions: list[Mention], table: Iterable[str]) -> list[tuple[int, int, str]]:
    """(start, end, phrase) of every occurrence of a phrase of `table` (whole words, longest
    first) that does not overlap an object mention."""
    found: list[tuple[int, int, str]] = []
    for phrase in sorted(table, key=len, reverse=True):
        for m in re.finditer(rf"\b{re.escape(phrase)}\b", text, re.IGNORECASE):
            overlaps = any(m.start() < x.end and x.start < m.end() for x in mentions)
            if not overlaps and not any(m.start() < e and s < m.end() for s, e, _ in found):
                found.append((m.start(), m.end(), phrase))
    return sorted(found)


def _match_case(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


def swap_word(text: str, mentions: list[Mention], table: dict[str, str], rng: random.Random
              ) -> tuple[str, str, str] | None:
    """Swap one phrase of `table` (outside object mentions) for its value: (text, old, new)."""
    spans = _free_spans(text, mentions, table)
    if not spans:
        return None
    start, end, phrase = rng.choice(spans)
    new = _match_case(table[phrase], text[start:end])
    out = _fix_article(text[:start] + new + text[end:], start, new)
    return out, text[start:end], new


def inject_attribute(text: str, mentions: list[Mention], vocab: ObjectVocabulary, rng: random.Random
                     ) -> tuple[str, str, str] | None:
    """Swap a colour, count or size word (never one that is also an object word, e.g. orange)."""
    colours = [c for c in COLOURS if vocab.category_of(c) is None]
    table = {c: rng.choice([o for o in colours if o != c]) for c in colours}
    table |= {n: rng.choice([o for o in COUNTS if o != n]) for n in COUNTS}  # two..ten: plural kept
    return swap_word(text, mentions, table | SIZES, rng)


def choose_absent(present: set[str], vocab: ObjectVocabulary, strategy: str, frequency: Counter,
                  co: dict[str, Counter], rng: random.Random, top_k: int = 3) -> str | None:
    """An object absent from `present`: uniformly (random), among the `top_k` most frequent
    (popular) or the `top_k` most co-occurring with the present objects (co-occurring; falls
    back to popular when nothing co-occurs, popular falls back to random)."""
    absent = [c for c in vocab.categories if c not in present and vocab.category_of(c) == c]
    if not absent:
        return None
    if strategy == "co-occurring":
        score = Counter({o: sum(co.get(p, Counter())[o] for p in present) for o in absent})
        ranked = [o for o, s in sorted(score.items(), key=lambda x: (-x[1], x[0])) if s > 0]
        if ranked:
            return rng.choice(ranked[:top_k])
        strategy = "popular"
    if strategy == "popular":
        ranked = [o for o in sorted(absent, key=lambda o: (-frequency[o], o)) if frequency[o] > 0]
        if ranked:
            return rng.choice(ranked[:top_k])
    return rng.choice(absent)


def _insertion_point(text: str, last: Mention) -> int:
    """Where " and a X" goes: right after the last mention when a boundary follows it,
    else at the end of its clause (before the next , . ; ! ? or the end)."""
    rest = text[last.end:]
    nxt = re.match(r"\s*([^\W_]+)", rest)
    if nxt is None or nxt.group(1).lower() in BOUNDARY or re.match(r"\s*[^\w\s]", rest):
        return last.end
    stop = re.search(r"[,.;!?]", rest)
    return last.end + (stop.start() if stop else len(rest.rstrip()))


def _colour_before(text: str, mention: Mention) -> str | None:
    """The colour word right before a mention ("a red circle" -> "red"), if any."""
    m = re.search(r"([^\W\d_]+)\s+$", text[:mention.start])
    return m.group(1).lower() if m and m.group(1).lower() in COLOURS else None


def insert_object(text: str, mentions: list[Mention], name: str, rng: random.Random | None = None) -> str:
    """`text` with "a NAME" added in its own style (see module docstring): when every mention
    carries a colour ("a red circle and a blue square"), the new object gets one too (drawn with
    `rng`); a list already written with commas ("a, b and c") gets "a, b, c and d", one joined
    by "and" alone ("a and b") continues with "and" (no punctuation the text did not use)."""
    colours = [_colour_before(text, m) for m in mentions]
    if mentions and all(colours):
        name = f"{(rng or random.Random(0)).choice(sorted(set(COLOURS[:4]) | set(colours)))} {name}"
    phrase = f"{article(name)} {name}"
    if not mentions:  # no object to attach to: "... with a dog" before the final punctuation
        body = text.rstrip()
        cut = len(body) - len(re.search(r"[.!?]*$", body).group())
        return f"{body[:cut]} with {phrase}{body[cut:]}{text[len(body):]}"
    last = mentions[-1]
    at = _insertion_point(text, last)
    commas = "," in text[mentions[0].start:last.start]
    if at == last.end and len(mentions) > 1 and commas:  # "X, Y and Z" becomes "X, Y, Z and W"
        between = text[mentions[-2].end:last.start]
        m = re.search(r"\s+and\s+", between)
        if m and not re.search(r"[.;!?]", between) and "," not in between[m.end():]:
            s, e = mentions[-2].end + m.start(), mentions[-2].end + m.end()
            return text[:s] + ", " + text[e:at] + f" and {phrase}" + text[at:]
    return text[:at] + f" and {phrase}" + text[at:]


def replace_object(text: str, target: Mention, name: str) -> str:
    """`text` with mention `target` replaced by `name` (its plural when the mention is plural)."""
    new = _match_case(plural_of(name) if target.plural else name, target.word)
    return _fix_article(text[:target.start] + new + text[target.end:], target.start, new)


def _object_pair(text: str, mentions: list[Mention], injected: str, mode: str, vocab: ObjectVocabulary,
                 rng: random.Random) -> tuple[str, set[str], str | None]:
    """(rejected, expected objects of rejected, replaced word or None)."""
    chosen_objects = {m.category for m in mentions}
    if mode == "replace" and mentions:
        target = rng.choice(mentions)
        rest = {m.category for m in mentions if m is not target}
        return replace_object(text, target, injected), rest | {injected}, target.word
    return insert_object(text, mentions, injected, rng), chosen_objects | {injected}, None


def valid_object_text(candidate: str, expected: set[str], vocab: ObjectVocabulary) -> bool:
    return bool(candidate.strip()) and vocab.objects(candidate) == expected


def _record_text(record: dict[str, Any], n: int) -> str:
    text = next((record[k] for k in TEXT_KEYS if isinstance(record.get(k), str)), None)
    if text is None:
        raise DataError(f"record {n}: no text field (one of {', '.join(TEXT_KEYS)})")
    return text


def _inject_one(text: str, present: set[str], kind: str, ctx: dict[str, Any]) -> dict[str, Any] | None:
    """One injection of `kind` into `text`, validated; None when the kind does not apply."""
    vocab, rng = ctx["vocab"], ctx["rng"]
    mentions = vocab.extract(text)
    if kind == "object":
        injected = choose_absent(present, vocab, ctx["strategy"], ctx["frequency"], ctx["co"], rng, ctx["top_k"])
        if injected is None:
            return None
        rejected, expected, replaced = _object_pair(text, mentions, injected, ctx["object_mode"], vocab, rng)
        if not valid_object_text(rejected, expected, vocab):
            return None
        return {"rejected": rejected, "injected": injected, "replaced": replaced}
    swapped = (inject_attribute(text, mentions, vocab, rng) if kind == "attribute"
               else swap_word(text, mentions, RELATIONS, rng))
    if swapped is None or [m.category for m in vocab.extract(swapped[0])] != [m.category for m in mentions]:
        return None
    return {"rejected": swapped[0], "injected": swapped[2], "replaced": swapped[1]}


def build_injection_pairs(records: Sequence[dict[str, Any]], vocab: ObjectVocabulary | None = None, *,
                          kinds: Sequence[str] = ("object",), strategy: str = "co-occurring",
                          object_mode: str = "insert", top_k: int = 3, seed: int = 0,
                          prompt: str = "Describe the image.", rewriter: Rewriter | None = None,
                          max_length_ratio: float = 1.5) -> tuple[list[dict[str, Any]], Counter]:
    """Preference pairs from ground-truth texts. Returns (pairs, counts).

    records: {"images" | "image", "prompt"?, one of chosen/caption/answer/text, "objects"?
        (annotated categories), "id" | "image_id"?}. One pair per record, its kind drawn
        (with `seed`) among the requested kinds that apply to the text.
    pairs: {"images", "prompt", "chosen", "rejected", "injected", "injection_kind",
        "replaced" (the swapped word, or None for an inserted object), "source_id"}.
    counts: kept per kind, dropped per reason, rewriter kept / fallback."""
    from mmalign.evaluation.coco import object_statistics

    vocab = vocab or load_vocabulary()
    for k in kinds:
        if k not in KINDS:
            raise DataError(f"injection kind {k!r} is not one of {KINDS}")
    if strategy not in STRATEGIES:
        raise DataError(f"injection strategy {strategy!r} is not one of {STRATEGIES}")
    texts = [_record_text(r, n) for n, r in enumerate(records)]
    present = _present_objects(records, texts, vocab)
    frequency, co = object_statistics({id(s): s for s in present}.values())  # one set per image
    ctx = dict(vocab=vocab, rng=random.Random(seed), strategy=strategy, frequency=frequency,
               co={k: Counter(v) for k, v in co.items()}, top_k=top_k, object_mode=object_mode)
    pairs, counts = [], Counter()
    for n, (record, text, objs) in enumerate(zip(records, texts, present)):
        order = list(kinds)
        ctx["rng"].shuffle(order)
        out = next((o | {"kind": k} for k in order if (o := _inject_one(text, objs, k, ctx)) is not None), None)
        if out is None:
            counts["dropped: no requested kind applies"] += 1
            continue
        counts[f"kept {out['kind']}"] += 1
        pairs.append({"images": record_images(record), "prompt": record.get("prompt", prompt), "chosen": text,
                      "rejected": out["rejected"], "injected": out["injected"], "injection_kind": out["kind"],
                      "replaced": out["replaced"], "source_id": record.get("id", record.get("image_id", n))})
    if rewriter is not None:
        _rewrite(pairs, vocab, rewriter, max_length_ratio, counts)
    return pairs, counts


def _present_objects(records: Sequence[dict[str, Any]], texts: list[str], vocab: ObjectVocabulary) -> list[set[str]]:
    """Per record, the objects of its image: the `objects` of every record of that image (same
    `image_id`, else same images) ∪ the objects all their texts mention, as CHAIR's ground
    truth. Records of one image share one set object."""
    by_image: dict[str, set[str]] = {}
    keys = []
    for n, (r, text) in enumerate(zip(records, texts)):
        key = str(r["image_id"]) if "image_id" in r else repr(record_images(r) or n)
        by_image.setdefault(key, set()).update(set(r.get("objects") or ()) | vocab.objects(text))
        keys.append(key)
    return [by_image[k] for k in keys]


def _rewrite(pairs: list[dict[str, Any]], vocab: ObjectVocabulary, rewriter: Rewriter, max_length_ratio: float,
             counts: Counter) -> None:
    """Replace object pairs' rejected text by the rewriter's where it passes validation: it
    mentions exactly the chosen text's objects + the injected one, differs from the chosen
    text, and its word count is within `max_length_ratio` of the chosen's."""
    todo = [i for i, p in enumerate(pairs) if p["injection_kind"] == "object"]
    rewrites = rewriter([(pairs[i]["chosen"], pairs[i]["injected"]) for i in todo])
    for i, text in zip(todo, rewrites):
        text = (text or "").strip().split("\n")[0].strip().strip('"')
        n_chosen, n_new = len(words(pairs[i]["chosen"])), len(words(text))
        expected = vocab.objects(pairs[i]["chosen"]) | {pairs[i]["injected"]}
        ok = valid_object_text(text, expected, vocab) and text != pairs[i]["chosen"]
        ok = ok and n_new <= max_length_ratio * n_chosen + 3 and n_new >= n_chosen / max_length_ratio
        counts["rewriter kept" if ok else "rewriter fell back to rule-based"] += 1
        if ok:
            pairs[i]["rejected"] = text
            pairs[i]["rewritten"] = True


class LocalRewriter:
    """Asks a local instruction model (a causal LM folder) to add the injected object in the
    text's own style; greedy, batched through `mmalign.generate.text.generate_answers`."""

    INSTRUCTION = ("Rewrite the image description below so that it also mentions {obj}, as if it were in the "
                   "image. Change nothing else and keep the same style and about the same length. Reply with "
                   "the rewritten description only.\n\nDescription: {text}")

    def __init__(self, path: str | Path, max_new_tokens: int = 96, batch_size: int = 8,
                 device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mmalign.config import resolve_path

        path = resolve_path(str(path), "rewriter model")  # a local folder, pkg://NAME or a Hub id
        if not Path(path).is_dir():
            raise DataError(f"rewriter model folder not found: {path}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, items: list[tuple[str, str]]) -> list[str]:
        from mmalign.generate.text import generate_answers

        chat = getattr(self.tokenizer, "chat_template", None) is not None
        prompts = [self.INSTRUCTION.format(obj=f"{article(o)} {o}", text=t) for t, o in items]
        records = [{"prompt": [{"role": "user", "content": p}] if chat else p} for p in prompts]
        return generate_answers(self.model, self.tokenizer, records, max_new_tokens=self.max_new_tokens,
                                do_sample=False, batch_size=self.batch_size)


# -- mmalign build-pairs inject -------------------------------------------------------------
def _coco_records(args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    """Records from a COCO captions json (+ instances): one per caption, image paths
    relative to the output folder."""
    from mmalign.evaluation.coco import load_captions, load_instances, read_json

    files = {im["id"]: im["file_name"] for im in read_json(args.captions, "captions").get("images", [])}
    objects: dict[Any, set[str]] = {}
    if args.annotations:
        more_files, objects = load_instances(args.annotations)
        files = {**more_files, **files}
    if not args.images:
        raise DataError("build-pairs inject: --captions needs --images (the folder of the caption json's images)")
    records = []
    for image_id, texts in load_captions(args.captions).items():
        if image_id not in files:
            raise DataError(f"{args.captions}: image_id {image_id!r} has no file_name in 'images'")
        path = os.path.relpath(Path(args.images).resolve() / files[image_id], out_dir.resolve())
        records += [{"images": [path], "caption": t, "image_id": image_id, "id": f"{image_id}-{k}",
                     "objects": sorted(objects.get(image_id, ()))} for k, t in enumerate(texts)]
    return records


def _jsonl_records(args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    """Records of a jsonl file, image paths re-based from its folder to the output folder."""
    from mmalign.evaluation.coco import load_instances, read_jsonl

    path = Path(args.input)
    records = read_jsonl(path, "input records")
    by_file: dict[str, set[str]] = {}
    by_id: dict[Any, set[str]] = {}
    if args.annotations:
        files, by_id = load_instances(args.annotations)
        by_file = {Path(f).name: by_id[i] for i, f in files.items()}
    for r in records:
        images = [os.path.relpath((path.parent / p).resolve(), out_dir.resolve()) if isinstance(p, str)
                  and not os.path.isabs(p) else p for p in record_images(r)]
        r.pop("image", None)
        r["images"] = images
        extra = by_id.get(r.get("image_id"), set()) | set().union(*(by_file.get(Path(str(p)).name, set())
                                                                     for p in images))
        r["objects"] = sorted(set(r.get("objects") or ()) | extra)
    return records


def run(args: argparse.Namespace) -> int:
    from mmalign.io import write_jsonl_atomic

    out = Path(args.out)
    if bool(args.input) == bool(args.captions):
        raise DataError("build-pairs inject: give exactly one of --input FILE.jsonl or --captions captions.json")
    records = _jsonl_records(args, out.parent) if args.input else _coco_records(args, out.parent)
    if args.limit is not None:
        records = records[:args.limit]
    vocab = load_vocabulary(args.vocabulary)
    rewriter = LocalRewriter(args.rewriter, args.rewriter_max_new_tokens) if args.rewriter else None
    pairs, counts = build_injection_pairs(records, vocab, kinds=args.kinds, strategy=args.strategy,
                                          object_mode=args.object_mode, top_k=args.top_k, seed=args.seed,
                                          prompt=args.prompt, rewriter=rewriter)
    write_jsonl_atomic(out, pairs)
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"[mmalign] build-pairs inject: {len(pairs)} pairs from {len(records)} records ({detail or 'nothing dropped'}); wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inject", help="hallucination-injected pairs from ground-truth captions/answers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="jsonl records {images, prompt?, caption|answer|chosen|text, objects?, image_id?}")
    p.add_argument("--captions", help="COCO-format captions json (one pair per caption)")
    p.add_argument("--images", help="image folder of --captions")
    p.add_argument("--annotations", help="COCO-format instances json: the objects present in each image")
    p.add_argument("--out", required=True, help="output pairs jsonl (image paths relative to it)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=["object"])
    p.add_argument("--strategy", choices=STRATEGIES, default="co-occurring", help="which absent object to inject")
    p.add_argument("--object-mode", choices=("insert", "replace"), default="insert")
    p.add_argument("--top-k", type=int, default=3, help="popular / co-occurring: draw among the top K")
    p.add_argument("--prompt", default="Describe the image.", help="prompt of records that have none")
    p.add_argument("--vocabulary", help="object word list, lines 'category, synonym, ...' (default: COCO)")
    p.add_argument("--rewriter", help="local instruction-model folder to rewrite object pairs (validated)")
    p.add_argument("--rewriter-max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="first N records")
    p.set_defaults(func=run)
