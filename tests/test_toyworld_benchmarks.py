"""AMBER, Object HalBench and MMHal-Bench on the toy world's scenes (mmalign/toyworld/benchmarks.py):
the converted truths equal the scene geometry, and each `mmalign eval` run end to end with the
shipped toy captioner gives the numbers the exact annotations give for the captioner's answers
(recomputed here from the scenes, independently of the evaluation code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.evaluation.mmhal import judge_prompt, parse_rating
from mmalign.toyworld.benchmarks import judge_fields, rules_review, write_amber, write_mmhal, write_objhal
from mmalign.toyworld.checker import caption_objects
from mmalign.toyworld.world import COLOURS, PARTNER, SHAPES, sample_scenes

MODEL = ["--model", "pkg://toyworld/captioner", "--device", "cpu", "--max-new-tokens", "24"]


def _answers(out: Path) -> dict[str, str]:
    return {str(r["key"]): r["answer"] for r in map(json.loads, out.with_suffix(".answers.jsonl").read_text()
                                                     .splitlines())}


def _truth_from_geometry(scene, query: str) -> str:
    """yes/no of an AMBER toy query read off the scene's objects (centres), not the converter."""
    objs = {o.shape: o for o in scene.objects}
    if m := re.fullmatch(r"is there a (\w+) in the image \?", query):
        return "yes" if m[1] in objs else "no"
    if m := re.fullmatch(r"is the (\w+) (red|green|blue|yellow) \?", query):
        return "yes" if objs[m[1]].colour == m[2] else "no"
    m = re.fullmatch(r"is the (\w+) (left of|right of|above|below) the (\w+) \?", query)
    a, b = objs[m[1]], objs[m[3]]
    holds = {"left of": a.cx < b.cx, "right of": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}[m[2]]
    return "yes" if holds else "no"


def test_amber_conversion_equals_the_scene_geometry(tmp_path):
    paths = write_amber(tmp_path, 40, seed=5)
    scenes = sample_scenes(40, 5, "test")
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    queries = json.loads(paths["queries"].read_text())
    assert [a["id"] for a in annotations] == [q["id"] for q in queries] == list(range(1, len(queries) + 1))
    for a, scene in zip(annotations[:40], scenes):
        assert a["type"] == "generative" and a["truth"] == sorted(scene.shapes())
        assert a["hallu"] == sorted({PARTNER[s] for s in scene.shapes() if s in PARTNER} - scene.shapes())
    by_image = {f"test_{i:06d}.png": s for i, s in enumerate(scenes)}
    kinds = {}
    for a, q in zip(annotations[40:], queries[40:]):
        assert a["truth"] == _truth_from_geometry(by_image[q["image"]], q["query"]), q
        kinds.setdefault(a["type"], []).append(a["truth"])
    assert kinds["discriminative-hallucination"].count("yes") == kinds["discriminative-hallucination"].count("no") == 40
    assert len(kinds["discriminative-attribute-state"]) == 40
    assert len(kinds["discriminative-relation"]) == sum(len(s.objects) >= 2 for s in scenes)
    assert {"yes", "no"} <= set(kinds["discriminative-relation"]) and {"yes", "no"} <= set(
        kinds["discriminative-attribute-state"])
    assert json.loads((tmp_path / "relation.json").read_text()) == {s: [] for s in SHAPES}


def test_converters_are_deterministic_from_the_command_line(tmp_path, capsys):
    from mmalign.toyworld.__main__ import main as world_main

    for name in ("amber", "objhal", "mmhal"):
        for run in ("a", "b"):
            assert world_main([name, str(tmp_path / run / name), "--n", "5", "--seed", "3"]) == 0
        files = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a" / name).rglob("*") if f.is_file())
        assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert "mmalign eval mmhal --questions" in capsys.readouterr().out


def test_mmhal_records_hold_the_scene_and_answers_true_of_it(tmp_path):
    p = write_mmhal(tmp_path, 48, seed=7)
    records, scenes = json.loads(p["questions"].read_text()), sample_scenes(48, 7, "test")
    assert [r["question_type"] for r in records[:16]] == ["attribute", "adversarial", "comparison", "counting",
                                                         "relation", "environment", "holistic", "other"] * 2
    for r, scene in zip(records, scenes):
        assert r["image_content"] == [f"{o.colour} {o.shape}" for o in scene.objects]
        truth = _yes_no_truth(scene, r["question"])
        if truth is not None:  # the human answer's yes / no is the geometry's
            assert r["gt_answer"].split()[0] == ("yes" if truth else "no"), r
        if r["question_type"] == "counting":
            assert r["gt_answer"].split()[2] == ["one", "two", "three"][len(scene.objects) - 1]
        if r["question_type"] == "attribute":
            shape = r["question"].split()[4]
            assert r["gt_answer"] == f"the {shape} is {next(o.colour for o in scene.objects if o.shape == shape)} ."


def _pct(a: float, b: float) -> float:
    return round(a / (b + 0.001) * 100, 1)


def test_eval_amber_with_the_toy_captioner_equals_the_exact_annotations(tmp_path, monkeypatch):
    n = 6
    paths = write_amber(tmp_path / "amber", n, seed=2)
    where = ["eval", "amber", "--data", str(paths["data"]), "--images", str(paths["images"]), *MODEL,
             "--batch-size", "8"]
    # killed while answering the second batch, then resumed: only the unanswered queries run again
    import mmalign.generate.text as text

    real, calls = text.generate_answers, []

    def killed_once(model, processor, records, **kw):
        calls.append(len(records))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, processor, records, **kw)

    monkeypatch.setattr(text, "generate_answers", killed_once)
    out = tmp_path / "amber.json"
    with pytest.raises(KeyboardInterrupt):
        main([*where, "--out", str(out)])
    assert main([*where, "--out", str(out)]) == 0
    total = len(json.loads(paths["queries"].read_text()))
    assert calls[0] == 8 and sum(calls[2:]) == total - 8  # no query answered twice
    monkeypatch.setattr(text, "generate_answers", real)
    assert main([*where, "--out", str(tmp_path / "again.json")]) == 0  # uninterrupted run, same numbers
    result = json.loads(out.read_text())
    assert result["metrics"] == json.loads((tmp_path / "again.json").read_text())["metrics"]

    answers, scenes = _answers(out), sample_scenes(n, 2, "test")
    named = [caption_objects(answers[str(i + 1)]) for i in range(n)]
    wrong = [[w for w in ws if w not in s.shapes()] for ws, s in zip(named, scenes)]
    hallu = [{PARTNER[x] for x in s.shapes() if x in PARTNER} - s.shapes() for s in scenes]
    m = result["metrics"]
    assert [c["hallucinated"] for c in result["generative"]] == wrong
    assert m["CHAIR"] == _pct(sum(map(len, wrong)), sum(map(len, named)))
    assert m["Hal"] == round(100 - sum(not w for w in wrong) / (n + 0.001) * 100, 1)
    assert m["Cover"] == _pct(sum(len(set(ws) & s.shapes()) for ws, s in zip(named, scenes)),
                              sum(len(s.shapes()) for s in scenes))
    assert m["Cog"] == _pct(sum(len(set(ws) & h) for ws, h in zip(named, hallu)), sum(map(len, hallu)))
    queries = json.loads(paths["queries"].read_text())[n:]
    by_image = {f"test_{i:06d}.png": s for i, s in enumerate(scenes)}
    said = {q["id"]: (answers[str(q["id"])].split() or [""])[0] for q in queries}
    truth = {q["id"]: _truth_from_geometry(by_image[q["image"]], q["query"]) for q in queries}
    assert m["Accuracy"] == _pct(sum(said[i] == truth[i] for i in truth), len(truth))
    no_no = sum(said[i] == truth[i] == "no" for i in truth)
    assert m["Precision"] == _pct(no_no, sum(s == "no" for s in said.values()))
    assert m["Recall"] == _pct(no_no, sum(t == "no" for t in truth.values()))
    assert m["AMBER"] == pytest.approx((100 - m["CHAIR"] + m["F1"]) / 2)


def test_eval_objhal_with_the_toy_captioner_equals_the_exact_annotations(tmp_path):
    n = 8
    p = write_objhal(tmp_path / "objhal", n, seed=4)
    out = tmp_path / "objhal.json"
    assert main(["eval", "objhal", "--questions", str(p["questions"]), "--annotations", str(p["annotations"]),
                 "--captions", str(p["captions"]), "--vocabulary", str(p["vocabulary"]), "--images",
                 str(p["images"]), *MODEL, "--out", str(out)]) == 0
    answers, scenes = _answers(out), sample_scenes(n, 4, "test")
    named = [set(caption_objects(answers[str(i + 1)])) for i in range(n)]   # distinct words, as Object HalBench
    wrong = [ws - s.shapes() for ws, s in zip(named, scenes)]
    assert any(wrong) and not all(wrong)  # the captioner hallucinates on some scenes, not all
    m = json.loads(out.read_text())["metrics"]
    assert m["CHAIRs"] == pytest.approx(100 * sum(map(bool, wrong)) / sum(map(bool, named)))
    assert m["CHAIRi"] == pytest.approx(100 * sum(map(len, wrong)) / sum(map(len, named)))
    assert m["Recall"] == pytest.approx(100 * sum(len(ws & s.shapes()) for ws, s in zip(named, scenes))
                                        / sum(len(s.shapes()) for s in scenes))


# -- MMHal-Bench: the rule judge ----------------------------------------------------------------
def _prompt(contents, question, answer, response):
    return judge_prompt({"image_content": contents, "question": question, "gt_answer": answer}, response)


@pytest.mark.parametrize("contents,answer,response,rating", [
    (["red circle"], "the circle is red .", "the circle is red", 5),          # both key words, no hallucination
    (["red circle"], "the circle is red .", "red", 4),                        # 1 of 2 key words
    (["red circle"], "the circle is red .", "yes", 3),                        # none
    (["red circle"], "the circle is red .", "a red circle and a square", 2),  # a square is not there
    (["red circle"], "the circle is red .", "the circle is blue", 1),         # wrong colour, 'circle' found
    (["red circle", "blue bar"], "no , there is no ring in the image .", "yes", 0),  # contradicts the 'no'
    (["red circle"], "no , there is no ring in the image .", "there is no ring", 5),  # a negated shape claims nothing
    (["red circle"], "no .", "no red ring", 5),
    (["green bar"], "there are two .", "a green bar and a green bars", 3),    # plural of a present shape
])
def test_rule_judge_rates_by_the_rubric(contents, answer, response, rating):
    review = rules_review(_prompt(contents, "q ?", answer, response))
    assert parse_rating(review) == rating  # the official strict parser reads exactly one rating
    assert ("Hallucination: Yes" in review) == (rating < 3)


def test_judge_fields_read_the_filled_prompt_back():
    assert judge_fields(_prompt(["red circle", "blue bar"], "what ?", "the bar is blue .", "a bar\n\nok")) == (
        ["red circle", "blue bar"], "what ?", "the bar is blue .", "a bar\n\nok")


def test_eval_mmhal_toy_captioner_and_rule_judge_equal_the_geometry(tmp_path):
    n = 16
    p = write_mmhal(tmp_path / "mmhal", n, seed=1)
    out = tmp_path / "mmhal.json"
    args = ["eval", "mmhal", "--questions", str(p["questions"]), "--judge", "rules:toyworld", "--images",
            str(p["images"]), *MODEL, "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    records, scenes = json.loads(p["questions"].read_text()), sample_scenes(n, 1, "test")
    hallucinated = [_hallucinates(s, r, item["answer"]) for s, r, item in zip(scenes, records, result["items"])]
    assert result["counts"] == {"questions": n, "unparsed": 0}
    assert [item["rating"] < 3 for item in result["items"]] == hallucinated
    assert result["metrics"]["Hallucination rate"] == pytest.approx(sum(hallucinated) / n)
    assert 0 < sum(hallucinated) < n
    assert result["metrics"]["Average score"] == pytest.approx(sum(i["rating"] for i in result["items"]) / n)


def _hallucinates(scene, record, answer: str) -> bool:
    """From the scene: a shape it lacks (not after "no"), a shape in a colour it has not, or a
    yes/no against the question's truth (relation: centres; 'other': colour; comparison: colours)."""
    colour = {o.shape: o.colour for o in scene.objects}
    words = [w[:-1] if w[:-1] in SHAPES else w for w in re.findall(r"[a-z]+", answer)]
    for k, w in enumerate(words):
        negated = (k >= 1 and words[k - 1] == "no") or (k >= 2 and words[k - 2] == "no" and words[k - 1] in COLOURS)
        if w not in SHAPES or negated:
            continue
        if w not in colour:
            return True
        before = words[k - 1] if k >= 1 else None
        after = words[k + 2] if words[k + 1:k + 2] == ["is"] and k + 2 < len(words) else None
        if any(c in COLOURS and c != colour[w] for c in (before, after)):
            return True
    truth, said = _yes_no_truth(scene, record["question"]), (words or [""])[0]
    return truth is not None and said in ("yes", "no") and (said == "yes") != truth


def _yes_no_truth(scene, q: str) -> bool | None:
    """The yes/no truth of a toy MMHal question, read off the scene (None: not a yes/no question)."""
    colour, truth = {o.shape: o.colour for o in scene.objects}, None
    if m := re.fullmatch(r"is the (\w+) (left of|right of|above|below) the (\w+) \?", q):
        a, b = (next(o for o in scene.objects if o.shape == s) for s in (m[1], m[3]))
        truth = {"left of": a.cx < b.cx, "right of": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}[m[2]]
    elif m := re.fullmatch(r"is there a (\w+) (\w+) in the image \?", q):
        truth = colour.get(m[2]) == m[1]
    elif m := re.fullmatch(r"is there a (\w+) in the image \?", q):
        truth = m[1] in colour
    elif m := re.fullmatch(r"is the (\w+) the same colour as the (\w+) \?", q):
        truth = colour[m[1]] == colour[m[2]] if m[2] in colour else False
    elif q.startswith("what colour is the") and q.split()[4] in set(SHAPES) - set(colour):
        truth = False  # adversarial: the shape is absent
    return truth
