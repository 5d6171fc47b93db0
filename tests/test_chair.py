"""CHAIR (mmalign/evaluation/chair.py) on hand-made captions, and `mmalign eval chair`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.data.preference import DataError
from mmalign.evaluation.chair import chair
from mmalign.evaluation.coco import ground_truth_objects, load_captions, load_instances
from mmalign.evaluation.objects import load_vocabulary

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "coco_sample"
TRUTH = {1: {"dog", "person", "frisbee"}, 2: {"cat", "couch"}, 3: {"pizza", "dining table", "cup"}}
CAPTIONS = {
    1: "A man throws a frisbee to his dog near a car.",       # person frisbee dog | car
    2: "A cat sleeping on a sofa.",                            # cat couch
    3: "Two hot dogs and a pizza on a table with a dog.",     # pizza table | hot dog, dog
}


def test_chair_equals_hand_computed_values():
    result = chair(CAPTIONS, TRUTH, load_vocabulary())
    assert result["CHAIR_s"] == pytest.approx(2 / 3)     # captions 1 and 3 hallucinate
    assert result["CHAIR_i"] == pytest.approx(3 / 10)    # car, hot dogs, dog of 4 + 2 + 4 mentions
    assert result["recall"] == pytest.approx(7 / 8)      # 3/3 + 2/2 + 2/3 (no cup) distinct objects
    assert result["counts"] == {"captions": 3, "hallucinated_captions": 2, "mentions": 10,
                                "hallucinated_mentions": 3, "gt_objects": 8, "gt_objects_mentioned": 7}
    third = result["captions"][2]
    assert third["hallucinated"] == [{"word": "hot dogs", "category": "hot dog"}, {"word": "dog", "category": "dog"}]
    assert third["mentioned"] == ["hot dog", "pizza", "dining table", "dog"]


def test_chair_accepts_caption_rows_and_rejects_unknown_images():
    rows = [{"image_id": i, "caption": c} for i, c in CAPTIONS.items()]
    assert chair(rows, TRUTH)["CHAIR_i"] == pytest.approx(0.3)
    with pytest.raises(DataError, match="no ground truth"):
        chair({9: "a dog"}, TRUTH)


def test_ground_truth_is_instances_union_caption_objects():
    vocab = load_vocabulary()
    files, annotated = load_instances(SAMPLE / "instances.json", vocab)
    assert files[1] == "000000000001.png" and annotated[1] == {"person", "horse"}
    truth = ground_truth_objects(annotated, load_captions(SAMPLE / "captions.json"), vocab)
    assert truth[1] == {"person", "horse", "bench"}       # "next to a bench" in a reference caption
    assert truth[3] == {"pizza", "dining table", "cup"}   # "a mug" is a cup


def test_eval_chair_from_precomputed_answers(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    rows = [{"image_id": 1, "caption": "A man riding a horse near a bench and a dog."},   # dog hallucinated
            {"image": "000000000002.png", "caption": "Two cats on a couch."},             # file-name key
            {"image_id": 5, "text": "A bird on a bench."}]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chair.json"
    assert main(["eval", "chair", "--annotations", str(SAMPLE / "instances.json"), "--captions",
                 str(SAMPLE / "captions.json"), "--answers", str(answers), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["CHAIR_s"] == pytest.approx(1 / 3) and result["CHAIR_i"] == pytest.approx(1 / 8)
    assert result["recall"] == pytest.approx((3 + 2 + 2) / (3 + 3 + 2))   # image 2 misses the dog
    assert "CHAIR_s 0.333 CHAIR_i 0.125" in capsys.readouterr().out


def test_eval_chair_end_to_end_on_a_tiny_llava(tmp_path, monkeypatch):
    from mmalign.toyvlm import save_tiny_llava

    model = save_tiny_llava(tmp_path / "tiny_llava")
    out = tmp_path / "chair.json"
    args = ["eval", "chair", "--model", str(model), "--images", str(SAMPLE / "images"),
            "--annotations", str(SAMPLE / "instances.json"), "--captions", str(SAMPLE / "captions.json"),
            "--prompt", "describe the image .", "--max-new-tokens", "4", "--limit", "3", "--batch-size", "2",
            "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["counts"]["captions"] == 3 and 0.0 <= result["CHAIR_i"] <= 1.0
    assert len(out.with_suffix(".answers.jsonl").read_text().splitlines()) == 3

    def no_generation(*a, **k):
        raise AssertionError("a resumed run must reuse the cached captions")

    monkeypatch.setattr("mmalign.generate.text.generate_answers", no_generation)
    assert main(args) == 0
    assert json.loads(out.read_text())["captions"] == result["captions"]


def test_eval_chair_without_model_or_answers_is_a_clear_error(capsys):
    assert main(["eval", "chair", "--annotations", str(SAMPLE / "instances.json")]) == 2
    assert "give --model and --images" in capsys.readouterr().err
