"""AMBER (mmalign/evaluation/amber.py) on a hand-built data folder: every expected number is
written by hand from the official inference.py's definitions (counters start at 0.001, ×100,
1 decimal; 'No' is the positive class)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.evaluation.amber import amber_score, generative_case, load_amber, score

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "coco_sample"
RELATION = {"dog": ["puppy"], "cat": ["kitten"], "grass": ["ground"], "ground": ["floor"], "bird": [], "sky": [],
            "light": [], "hound": []}
ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "grass"], "hallu": ["cat", "bird"]},
    {"id": 2, "type": "generative", "truth": ["sky"], "hallu": ["bird"]},
    {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 4, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 5, "type": "discriminative-attribute-state", "truth": "yes"},
    {"id": 6, "type": "discriminative-attribute-state", "truth": "no"},
    {"id": 7, "type": "discriminative-relation", "truth": "yes"},
    {"id": 8, "type": "relation", "truth": "no"},
]
RESPONSES = {
    1: "A puppy on the ground with a cat and light.",  # kept puppy ground cat light: cat hallucinated
    2: "Two birds in the sky.",                        # kept bird sky: bird hallucinated
    3: "No", 4: "Yes", 5: "yes.", 6: "No, it is not.", 7: "Maybe", 8: "No",
}


@pytest.fixture
def data(tmp_path) -> Path:
    (tmp_path / "query").mkdir()
    (tmp_path / "relation.json").write_text(json.dumps(RELATION))
    (tmp_path / "annotations.json").write_text(json.dumps(ANNOTATIONS))
    (tmp_path / "safe_words.txt").write_text("light\n")
    return tmp_path


def test_amber_score_of_the_paper():
    assert amber_score(7.8, 86.0) == pytest.approx(89.1)


def test_metrics_equal_hand_computed_values(data):
    m = score(load_amber(data), RESPONSES)["metrics"]
    # kept nouns 4 + 2, hallucinated cat, bird: 2 / 6.001 -> 33.3; covered dog grass sky 3 / 3.001 -> 100.0;
    # both responses hallucinate -> Hal 100 - 0 = 100.0; hallu objects named cat, bird | bird: 2 / 3.001 -> 66.6
    assert {k: m[k] for k in ("CHAIR", "Cover", "Hal", "Cog")} == {"CHAIR": 33.3, "Cover": 100.0, "Hal": 100.0,
                                                                    "Cog": 66.6}
    # answers (normalised) No Yes Yes No Maybe No vs truth no no yes no yes no: correct 3 5 6 8 -> 4 / 6.001;
    # said No 3 (all right), truth no 4: P 3 / 3.001 -> 100.0, R 3 / 4.001 -> 75.0, F1 1.5 / 1.7501 -> 85.7
    assert {k: m[k] for k in ("Accuracy", "Precision", "Recall", "F1")} == {"Accuracy": 66.7, "Precision": 100.0,
                                                                            "Recall": 75.0, "F1": 85.7}
    # existence: 3, 4 -> acc 1 / 2.001 = 50.0, P 1 / 1.001 = 99.9, R 50.0, F1 .999 / (1.499 + .001) = 66.6
    assert m["existence"] == {"Accuracy": 50.0, "Precision": 99.9, "Recall": 50.0, "F1": 66.6}
    # state: 5, 6 both right -> acc 2 / 2.001 = 99.950 -> 100.0; P = R = 1 / 1.001 -> 99.9;
    # F1 2 (.999)(.999) / (1.998 + .0001) = 99.895 -> 99.9 (the 0.001 starts show)
    assert m["state"] == {"Accuracy": 100.0, "Precision": 99.9, "Recall": 99.9, "F1": 99.9}
    # attribute pools the state, number, action counters, each started at 0.001: acc 2 / 2.003 -> 99.9,
    # P = R = 1 / 1.003 -> 99.7, F1 2 (.997)(.997) / (1.994 + .0001) = 99.695 -> 99.7
    assert m["attribute"] == {"Accuracy": 99.9, "Precision": 99.7, "Recall": 99.7, "F1": 99.7}
    assert m["relation"]["Accuracy"] == 50.0
    assert m["AMBER"] == pytest.approx((100 - 33.3 + 85.7) / 2)


def test_answers_as_is_compares_exact_strings(data):
    m = score(load_amber(data), RESPONSES, as_is=True)["metrics"]
    assert m["Accuracy"] == 33.3   # "yes." and "No, it is not." are now wrong: 2 / 6.001


def test_first_match_marks_the_first_listed_object_as_the_script_does():
    """'ground' is grass's association and a truth object itself: the script's search finds the
    association first, so grass is covered and ground is not."""
    case = generative_case(["ground"], {"truth": ["grass", "ground"], "hallu": []}, RELATION,
                           {"grass", "ground"}, set(), lambda a, b: a == b)
    assert (case["covered"], case["truth"], case["hallucinated"]) == (1, 2, [])


def test_similarity_is_pluggable():
    entry = {"truth": ["dog"], "hallu": []}
    vocab = {"dog", "hound"}
    exact = generative_case(["hound"], entry, RELATION, vocab, set(), lambda a, b: a == b)
    close = generative_case(["hound"], entry, RELATION, vocab, set(), lambda a, b: {a, b} == {"hound", "dog"} or a == b)
    assert exact["hallucinated"] == ["hound"] and exact["covered"] == 0
    assert close["hallucinated"] == [] and close["covered"] == 1


def test_eval_amber_from_the_official_answer_format(data, tmp_path, capsys):
    answers = tmp_path / "inference.json"
    answers.write_text(json.dumps([{"id": i, "response": r} for i, r in RESPONSES.items()]))
    out = tmp_path / "amber.json"
    assert main(["eval", "amber", "--data", str(data), "--answers", str(answers), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "amber" and record["model"] == str(answers)
    assert record["data"] == {"data": str(data)} and record["settings"]["similarity"] == "exact"
    assert record["metrics"]["CHAIR"] == 33.3 and record["metrics"]["AMBER"] == pytest.approx(76.2)
    assert "similarity exact" in capsys.readouterr().out


def test_eval_amber_on_a_tiny_llava_resumes_from_cached_answers(data, tmp_path, monkeypatch):
    from mmalign.toyvlm import save_tiny_llava

    model = save_tiny_llava(tmp_path / "tiny_llava")
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps([{"id": 1, "image": "000000000001.png", "query": "describe the image ."},
                                   {"id": 3, "image": "000000000002.png", "query": "is there a dog ?"}]))
    out = tmp_path / "amber.json"
    args = ["eval", "amber", "--data", str(data), "--queries", str(queries), "--model", str(model),
            "--images", str(SAMPLE / "images"), "--max-new-tokens", "3", "--out", str(out)]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert first["counts"] == {"generative": 1, "discriminative": 1}
    assert len(out.with_suffix(".answers.jsonl").read_text().splitlines()) == 2

    def no_generation(*a, **k):
        raise AssertionError("a resumed run must reuse the cached answers")

    monkeypatch.setattr("mmalign.generate.text.generate_answers", no_generation)
    assert main(args) == 0
    assert json.loads(out.read_text())["metrics"] == first["metrics"]


def test_missing_data_folder_says_where_to_get_it(tmp_path, capsys):
    assert main(["eval", "amber", "--data", str(tmp_path), "--answers", "x.json"]) == 2
    assert "junyangwang0410/AMBER" in capsys.readouterr().err


def _random_amber(tmp_path: Path, seed: int) -> tuple[Path, dict[int, str]]:
    """A random AMBER-layout folder (40 generative entries over a 16-word vocabulary with shared
    associations, 120 discriminative of every type) and random responses to all of it."""
    import random

    rng = random.Random(seed)
    objects = ["dog", "cat", "grass", "ground", "sky", "tree", "car", "road", "person", "bird", "water", "boat"]
    relation = {o: rng.sample([w for w in objects + ["floor", "street", "puppy", "man"] if w != o], rng.randint(0, 3))
                for o in objects}
    annotations = []
    for i in range(1, 41):
        truth = rng.sample(objects, rng.randint(1, 4))
        annotations.append({"id": i, "type": "generative", "truth": truth,
                            "hallu": rng.sample([o for o in objects if o not in truth], rng.randint(0, 3))})
    types = ["discriminative-hallucination", "discriminative-attribute-state", "discriminative-attribute-number",
             "discriminative-attribute-action", "discriminative-relation", "relation"]
    for i in range(41, 161):
        annotations.append({"id": i, "type": rng.choice(types), "truth": rng.choice(["yes", "no"])})
    data = tmp_path / f"amber{seed}"
    data.mkdir()
    (data / "relation.json").write_text(json.dumps(relation))
    (data / "annotations.json").write_text(json.dumps(annotations))
    (data / "safe_words.txt").write_text("light\nsign\n")
    vocab = sorted(set(relation) | {w for ws in relation.values() for w in ws}) + ["light", "sign", "the", "Dog"]
    responses = {a["id"]: ("A " + " and ".join(rng.choice(vocab) + rng.choice(["", "", "s"])
                                              for _ in range(rng.randint(0, 8))) + ".")
                 if a["type"] == "generative" else rng.choice(["Yes", "No", "yes", "No.", "Maybe"])
                 for a in annotations}
    return data, responses


@pytest.mark.parametrize("seed, similar", [(0, lambda a, b: a == b), (1, lambda a, b: a[:2] == b[:2])])
def test_equals_the_official_script_on_random_cases(tmp_path, seed, similar):
    """tests/amber_official.py is inference.py unchanged but for its imports; given the same nouns
    and similarity, every number it prints equals mmalign's."""
    import re
    from types import SimpleNamespace

    import amber_official
    from mmalign.evaluation.amber import simple_nouns

    data, responses = _random_amber(tmp_path, seed)
    (data / "metrics.txt").write_text("".join(f"{p}{k}={'0' if k == 'score' else '0.001'}\n"
                                              for p in ("chair_", "safe_cover_", "hallu_cover_", "non_hallu_",
                                                        "qa_correct_", "qa_no_", "qa_ans_no_", "as_qa_correct_",
                                                        "as_qa_no_", "as_qa_ans_no_", "an_qa_correct_", "an_qa_no_",
                                                        "an_qa_ans_no_", "aa_qa_correct_", "aa_qa_no_",
                                                        "aa_qa_ans_no_", "asso_qa_correct_", "asso_qa_no_",
                                                        "asso_qa_ans_no_", "ha_qa_correct_", "ha_qa_no_",
                                                        "ha_qa_ans_no_") for k in ("score", "num")))
    (data / "responses.json").write_text(json.dumps([{"id": i, "response": r} for i, r in responses.items()]))
    amber_official.extract_nouns = simple_nouns
    amber_official.check_synonyms_word = lambda a, b, threshold: similar(a, b)
    printed = amber_official.main(SimpleNamespace(
        word_association=str(data / "relation.json"), safe_words=str(data / "safe_words.txt"),
        inference_data=str(data / "responses.json"), annotation=str(data / "annotations.json"),
        metrics=str(data / "metrics.txt"), similarity_score=0.8, evaluation_type="a"))
    blocks = {b.split(":")[0]: {k: float(v) for k, v in re.findall(r"^(\w+):\s+([\d.]+)", b, re.M)}
              for b in re.split(r"\n(?=[\w ]+:\n)", printed.strip())}
    m = score(load_amber(data), responses, simple_nouns, similar, as_is=True)["metrics"]
    assert blocks["Generative Task"] == {k: m[k] for k in ("CHAIR", "Cover", "Hal", "Cog")}
    assert blocks["Descriminative Task"] == {k: m[k] for k in ("Accuracy", "Precision", "Recall", "F1")}
    for official, ours in (("Exsitence", "existence"), ("Attribute", "attribute"), ("State", "state"),
                           ("Number", "number"), ("Action", "action"), ("Relation", "relation")):
        assert blocks[official] == m[ours], ours
    assert 0 < m["CHAIR"] < 100 and 0 < m["Cover"] < 100   # the case exercises both branches


def test_optional_nltk_and_spacy_steps_fail_with_one_clear_line(data, tmp_path, capsys):
    """Neither NLTK's data nor spaCy's model can be downloaded here: asking for them is a DataError."""
    answers = tmp_path / "a.json"
    answers.write_text(json.dumps([{"id": 1, "response": "A dog."}]))
    for option, word in (("--nouns", "nltk"), ("--similarity", "spacy")):
        code = main(["eval", "amber", "--data", str(data), "--answers", str(answers), option, word])
        err = capsys.readouterr().err
        if code == 0:   # installed with its data on this machine: nothing to check
            continue
        assert code == 2 and f"{option} {word} needs" in err
