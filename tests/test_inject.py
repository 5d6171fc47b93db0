"""Hallucination injection pairs (mmalign/builders/inject.py) and `mmalign build-pairs inject`."""

from __future__ import annotations

import re

import json
from collections import Counter
from pathlib import Path

import pytest

from mmalign.builders.inject import build_injection_pairs
from mmalign.cli import main
from mmalign.data.preference import validate_records
from mmalign.evaluation.objects import ObjectVocabulary, load_vocabulary, words

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "coco_sample"
CAPTIONS = ["A man riding a horse on a beach.", "Two dogs sit on a couch next to a table.",
            "A pizza box on a table", "A scenic view of the mountains.", "a cat, a dog and a bird near a bench",
            "An apple and three bananas in a large blue bowl", "A person holding an umbrella in the rain."]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> ObjectVocabulary:
    path = tmp_path_factory.mktemp("vocab") / "shapes.txt"
    path.write_text("circle\nsquare\ntriangle\n")
    return ObjectVocabulary.load(path)


def word_list(text: str) -> list[str]:
    return [w for w, _, _ in words(text)]


def is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(w in it for w in small)


def test_object_inserted_in_the_captions_list_style(shapes):
    records = [{"images": ["a.png"], "caption": "a red circle and a square", "objects": ["circle", "square"]}]
    pairs, counts = build_injection_pairs(records, shapes, strategy="random")
    assert pairs[0]["rejected"] == "a red circle and a square and a triangle"  # no punctuation it did not use
    records = [{"images": ["a.png"], "caption": "a circle, a square", "objects": ["circle", "square"]}]
    assert build_injection_pairs(records, shapes, strategy="random")[0][0]["rejected"] == (
        "a circle, a square and a triangle")
    # every object carries a colour: the injected one gets one too (a pair that differs in style
    # as well as content would teach style)
    records = [{"images": ["a.png"], "caption": "a red circle and a blue square", "objects": ["circle", "square"]}]
    rejected = build_injection_pairs(records, shapes, strategy="random")[0][0]["rejected"]
    assert re.fullmatch(r"a red circle and a blue square and an? (red|blue|green|yellow) \w+", rejected), rejected
    assert (pairs[0]["injected"], pairs[0]["injection_kind"], pairs[0]["source_id"]) == ("triangle", "object", 0)
    assert counts == Counter({"kept object": 1})


@pytest.mark.parametrize("strategy", ["random", "popular", "co-occurring"])
def test_object_injection_adds_only_the_injected_object_and_keeps_every_word(strategy):
    vocab = load_vocabulary()
    records = [{"images": [f"{i}.png"], "caption": c} for i, c in enumerate(CAPTIONS)]
    pairs, _ = build_injection_pairs(records, vocab, strategy=strategy, seed=1)
    assert len(pairs) == len(CAPTIONS)
    for p in pairs:
        chosen, rejected = vocab.objects(p["chosen"]), vocab.objects(p["rejected"])
        assert p["injected"] not in chosen and rejected == chosen | {p["injected"]}
        extra = Counter(word_list(p["rejected"])) - Counter(word_list(p["chosen"]))
        assert not Counter(word_list(p["chosen"])) - Counter(word_list(p["rejected"]))   # nothing removed
        assert set(extra) <= {"and", "with", "a", "an"} | set(p["injected"].split())
        assert is_subsequence(word_list(p["chosen"]), word_list(p["rejected"]))         # order kept
        assert len(word_list(p["rejected"])) - len(word_list(p["chosen"])) <= 2 + len(p["injected"].split())


def test_co_occurring_and_popular_choices_follow_the_data():
    vocab = load_vocabulary()
    catch = "A dog catching a frisbee."
    records = ([{"image_id": k, "caption": catch, "objects": ["dog", "frisbee"]} for k in range(3)]
               + [{"image_id": 10 + k, "caption": "A cat on a chair.", "objects": ["cat", "chair"]} for k in range(4)]
               + [{"image_id": 99, "caption": "A dog on the grass.", "objects": ["dog"]}])
    co, _ = build_injection_pairs(records, vocab, strategy="co-occurring", top_k=1)
    assert co[-1]["injected"] == "frisbee" and co[-1]["rejected"] == "A dog and a frisbee on the grass."
    popular, _ = build_injection_pairs(records, vocab, strategy="popular", top_k=1)
    assert popular[-1]["injected"] == "cat"   # 4 images: the most frequent object absent from image 99


def test_object_replacement_keeps_number(tmp_path):
    vocab_file = tmp_path / "v.txt"
    vocab_file.write_text("dog\ncat\nknife\n")
    vocab = ObjectVocabulary.load(vocab_file)
    records = [{"caption": "Two dogs on the grass.", "objects": ["dog"]},
               {"caption": "A dog here.", "objects": ["dog"]}]
    pairs, _ = build_injection_pairs(records, vocab, strategy="random", object_mode="replace", seed=0)
    assert pairs[0]["rejected"] in ("Two cats on the grass.", "Two knives on the grass.")
    assert pairs[0]["replaced"] == "dogs"
    assert pairs[1]["rejected"] in ("A cat here.", "A knife here.")


@pytest.mark.parametrize("kind, text, allowed", [
    ("attribute", "A red bus parked next to two cars.", {("red", None), ("two", None)}),
    ("attribute", "A large dog on a bench.", {("large", "small")}),
    ("relation", "A cat to the left of a dog.", {("left", "right")}),
    ("relation", "A laptop on top of a desk.", {("on top of", "underneath")}),
])
def test_attribute_and_relation_swaps_change_one_word_and_no_object(kind, text, allowed):
    vocab = load_vocabulary()
    pairs, _ = build_injection_pairs([{"caption": text}], vocab, kinds=[kind], seed=2)
    p = pairs[0]
    assert p["injection_kind"] == kind and p["rejected"] != text
    assert [m.category for m in vocab.extract(p["rejected"])] == [m.category for m in vocab.extract(text)]
    assert any(p["replaced"] == old and (new is None or p["injected"] == new) for old, new in allowed)
    assert p["rejected"] == text.replace(p["replaced"], p["injected"], 1)


def test_no_applicable_kind_is_dropped_and_counted():
    # "orange" is an object mention here (as in CHAIR), so it is not a colour to swap
    pairs, counts = build_injection_pairs([{"caption": "An orange cat."}], kinds=["attribute", "relation"])
    assert pairs == [] and counts == Counter({"dropped: no requested kind applies": 1})


def test_rewriter_output_is_kept_only_when_valid(shapes):
    records = [{"caption": "a circle", "objects": ["circle", "square"]} for _ in range(3)]   # absent: triangle
    answers = iter(["a circle next to a triangle", "a square and a triangle", "a big circle"])
    seen = []

    def rewriter(items):
        seen.extend(items)
        return [next(answers) for _ in items]

    pairs, counts = build_injection_pairs(records, shapes, strategy="random", rewriter=rewriter)
    assert seen == [("a circle", "triangle")] * 3
    assert [p["rejected"] for p in pairs] == ["a circle next to a triangle", "a circle and a triangle",
                                              "a circle and a triangle"]
    assert counts["rewriter kept"] == 1 and counts["rewriter fell back to rule-based"] == 2


def test_local_rewriter_runs_a_local_model_and_falls_back(tiny_lm_dir):
    from mmalign.builders.inject import LocalRewriter

    records = [{"caption": "A dog on a bench.", "objects": ["dog", "bench"]}]
    pairs, counts = build_injection_pairs(records, rewriter=LocalRewriter(tiny_lm_dir, max_new_tokens=4))
    assert counts["rewriter fell back to rule-based"] == 1          # a random toy LM never passes validation
    assert load_vocabulary().objects(pairs[0]["rejected"]) == {"dog", "bench", pairs[0]["injected"]}


def test_build_pairs_inject_cli_on_the_coco_sample(tmp_path, capsys):
    out = tmp_path / "pairs" / "inject.jsonl"
    assert main(["build-pairs", "inject", "--captions", str(SAMPLE / "captions.json"), "--images",
                 str(SAMPLE / "images"), "--annotations", str(SAMPLE / "instances.json"), "--out", str(out),
                 "--kinds", "object", "attribute", "relation", "--seed", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and validate_records(rows, str(out), "pair") == "pair"
    present = {"person", "horse", "bench"}   # annotations of image 1 + the bench its other caption names
    for r in rows:
        assert (out.parent / r["images"][0]).is_file()
        assert {"injected", "injection_kind", "source_id"} <= set(r)
        if r["injection_kind"] == "object" and r["images"][0].endswith("000000000001.png"):
            assert r["injected"] not in present
    assert "inject: 12 pairs from 12 records" in capsys.readouterr().out
