"""POPE (mmalign/evaluation/pope.py): the official files, question building, answer parsing,
metrics, and `mmalign eval pope`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.data.preference import DataError
from mmalign.evaluation.pope import (build_questions, load_questions, parse_answer, pope_metrics,
                                     question_object)

ROOT = Path(__file__).resolve().parents[1]
POPE = ROOT / "datasets" / "pope"
SAMPLE = ROOT / "datasets" / "coco_sample"


@pytest.mark.parametrize("setting", ["random", "popular", "adversarial"])
def test_official_files_load_as_they_are(setting):
    rows = load_questions(POPE / f"coco_pope_{setting}.json")
    assert len(rows) == 3000 and sum(r["label"] == "yes" for r in rows) == 1500
    assert len({r["image"] for r in rows}) == 500
    assert rows[0] == {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                       "text": "Is there a snowboard in the image?", "label": "yes"}
    assert all(question_object(r["text"]) for r in rows)


def test_bad_question_rows_are_named(tmp_path):
    path = tmp_path / "q.jsonl"
    row = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="row 1 label 'maybe'"):
        load_questions(path)


# (answer, official evaluate.py reading, lenient reading), written by hand from POPE's evaluate.py:
# first sentence (before the first "."), commas deleted, split on " ", no iff a piece is No/no/not.
PARSER_CASES = [
    ("Yes, there is a dog in the image.", "yes", "yes"),
    ("No", "no", "no"),
    ("No.", "no", "no"),
    ("No, there is no dog.", "no", "no"),           # "No," -> "No" once commas are deleted
    ("There is no dog in the image.", "no", "no"),
    ("I do not see one", "no", "no"),
    ("Yes. There is not a cat though.", "yes", "yes"),   # first sentence only, in both
    ("NO", "yes", "no"),                            # official: case-sensitive pieces
    ("No!", "yes", "no"),
    ("(No)", "yes", "no"),
    ("**No**", "yes", "no"),
    ("No\nThere is none", "yes", "no"),            # split on " " only: "No\nThere" is one piece
    ("There isn't a dog", "yes", "yes"),             # neither reads n't
    ("Not at all", "yes", "no"),                    # "Not" is not a piece the official rule knows
    ("Nothing suggests otherwise", "yes", "yes"),   # whole pieces / words: "nothing" is not "no"
    ("no; none", "yes", "no"),
    ("", "yes", "yes"),
]


@pytest.mark.parametrize("answer, official, lenient", PARSER_CASES)
def test_parse_answer_official_and_lenient(answer, official, lenient):
    assert parse_answer(answer) == official            # official is the default
    assert parse_answer(answer, "official") == official
    assert parse_answer(answer, "lenient") == lenient


def test_unknown_parser_is_a_clear_error():
    with pytest.raises(DataError, match="parser 'strict' is not one of"):
        parse_answer("No", "strict")


def test_metrics_equal_hand_computed_values():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]   # TP 2, FP 1, TN 2, FN 1
    m = pope_metrics(preds, labels)
    assert m["counts"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1, "n": 6}
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == pytest.approx((4 / 6, 2 / 3, 2 / 3, 0.5))
    assert m["f1"] == pytest.approx(2 / 3)
    assert pope_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0   # no yes predicted: 0, no crash


# One eligible image (dog, cat, car); 2-object images set frequency and co-occurrence:
# dog-frisbee, cat-couch, car-truck 3 times each; person and bench 5 times (the most popular).
HAND = {"target.jpg": ["dog", "cat", "car"],
        **{f"p{k}.jpg": pair for k, pair in enumerate([["dog", "frisbee"], ["cat", "couch"], ["car", "truck"]] * 3)},
        **{f"b{k}.jpg": ["person", "bench"] for k in range(5)}}


def pairs_of(questions):
    objs = [question_object(q["text"]) for q in questions]
    assert [q["label"] for q in questions] == ["yes", "no"] * (len(questions) // 2)
    return [(objs[i], objs[i + 1]) for i in range(0, len(objs), 2)]


def test_adversarial_asks_for_each_objects_most_co_occurring_absent_partner():
    questions = build_questions(HAND, "adversarial", num_images=10, seed=0)
    assert {q["image"] for q in questions} == {"target.jpg"}   # the only image with >= 3 objects
    assert sorted(pairs_of(questions)) == [("car", "truck"), ("cat", "couch"), ("dog", "frisbee")]


def test_popular_asks_for_the_most_frequent_absent_objects():
    questions = build_questions(HAND, "popular", num_images=10, seed=3)
    # bench 5, person 5 (tie: by name), then couch / frisbee / truck with 3 each
    assert [no for _, no in pairs_of(questions)] == ["bench", "person", "couch"]


def test_random_asks_for_distinct_absent_objects_deterministically():
    questions = build_questions(HAND, "random", num_images=10, seed=7)
    negatives = [no for _, no in pairs_of(questions)]
    assert len(set(negatives)) == 3 and not set(negatives) & {"dog", "cat", "car"}
    assert questions == build_questions(HAND, "random", num_images=10, seed=7)
    assert questions[0]["text"].startswith("Is there a ") and questions[0]["question_id"] == 1


def test_eval_pope_on_official_files_with_precomputed_answers(tmp_path, capsys):
    rows = load_questions(POPE / "coco_pope_random.json")
    always_yes = tmp_path / "yes.jsonl"        # LLaVA's answer files keep the answer in "text"
    always_yes.write_text("".join(json.dumps({"question_id": r["question_id"], "text": "Yes"}) + "\n" for r in rows))
    out = tmp_path / "pope.json"
    assert main(["eval", "pope", "--questions", str(POPE / "coco_pope_random.json"),
                 "--answers", str(always_yes), "--out", str(out)]) == 0
    r = json.loads(out.read_text())["sets"]["coco_pope_random"]
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"]) == pytest.approx((0.5, 0.5, 1.0, 1.0))
    assert r["f1"] == pytest.approx(2 / 3)
    assert "coco_pope_random acc 0.500" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["benchmark"] == "pope" and record["model"] == [str(always_yes)]   # answers files
    assert record["data"] == {"questions": [str(POPE / "coco_pope_random.json")]}
    assert record["settings"]["parser"] == "official"
    assert record["metrics"]["coco_pope_random"] == pytest.approx(
        {"Accuracy": 50.0, "Precision": 50.0, "Recall": 100.0, "F1": 200 / 3, "Yes": 100.0})


def test_eval_pope_parser_option_changes_how_answers_are_read(tmp_path):
    """Four questions (yes, no, no, no) answered "Yes", "**No**", "No.", "(No)": the official
    rule reads yes, yes, no, yes (TP 1, FP 2, TN 1); the lenient one yes, no, no, no (TP 1, TN 3)."""
    questions = tmp_path / "q.jsonl"
    labels = ["yes", "no", "no", "no"]
    questions.write_text("".join(json.dumps({"question_id": i, "image": "a.jpg", "text": "Is there a dog in the image?",
                                             "label": lab}) + "\n" for i, lab in enumerate(labels)))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "answer": a}) + "\n"
                               for i, a in enumerate(["Yes", "**No**", "No.", "(No)"])))
    metrics = {}
    for parser in ("official", "lenient"):
        out = tmp_path / f"{parser}.json"
        assert main(["eval", "pope", "--questions", str(questions), "--answers", str(answers), "--parser", parser,
                     "--out", str(out)]) == 0
        metrics[parser] = json.loads(out.read_text())["metrics"]["q"]
    assert metrics["official"] == pytest.approx({"Accuracy": 50.0, "Precision": 100 / 3, "Recall": 100.0,
                                                 "F1": 50.0, "Yes": 75.0})
    assert metrics["lenient"] == pytest.approx({"Accuracy": 100.0, "Precision": 100.0, "Recall": 100.0,
                                                "F1": 100.0, "Yes": 25.0})


def test_eval_pope_built_from_annotations_on_a_tiny_llava(tmp_path):
    from mmalign.toyvlm import save_tiny_llava

    model = save_tiny_llava(tmp_path / "tiny_llava")
    out = tmp_path / "pope.json"
    assert main(["eval", "pope", "--model", str(model), "--images", str(SAMPLE / "images"),
                 "--annotations", str(SAMPLE / "instances.json"), "--setting", "adversarial", "popular",
                 "--num-images", "2", "--max-new-tokens", "3", "--write-questions", str(tmp_path / "q"),
                 "--out", str(out)]) == 0
    sets = json.loads(out.read_text())["sets"]
    assert set(sets) == {"adversarial", "popular"}
    assert all(s["counts"]["n"] == 12 and s["counts"]["tp"] + s["counts"]["fn"] == 6 for s in sets.values())
    assert len(load_questions(tmp_path / "q" / "pope_adversarial.jsonl")) == 12
