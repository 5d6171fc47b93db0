"""`mmalign build-pairs existence`: yes/no object-existence pairs sampled as POPE samples them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmalign.builders.existence import build_existence_pairs
from mmalign.cli import main
from mmalign.data.preference import DataError, load_preference_data
from mmalign.evaluation.pope import build_questions

# cat and dog co-occur twice, cat and bed once: for an image holding only a cat the
# adversarial negative must be "dog", the object that co-occurs most with cat.
OBJECTS = {"a.png": ["cat", "dog"], "b.png": ["cat", "dog"], "c.png": ["cat", "bed"], "e.png": ["cat"]}


def write_coco(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    names = sorted({o for objs in OBJECTS.values() for o in objs})
    images, annotations = [], []
    for i, (name, objs) in enumerate(OBJECTS.items(), 1):
        Image.new("RGB", (4, 4)).save(folder / "images" / name)
        images.append({"id": i, "file_name": name})
        annotations += [{"id": len(annotations) + 1, "image_id": i, "category_id": names.index(o) + 1,
                         "bbox": [0, 0, 1, 1], "area": 1} for o in objs]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}))
    return path


def test_pairs_are_popes_questions_with_the_true_answer_chosen():
    pairs = build_existence_pairs(OBJECTS, setting="adversarial", num_images=4, seed=5, suffix=" Answer.")
    questions = build_questions(OBJECTS, "adversarial", 4, seed=5, per_image=1)
    assert len(pairs) == len(questions) == 8
    for p, q in zip(pairs, questions):
        present = p["object"] in OBJECTS[p["images"][0]]
        assert p["prompt"] == q["text"] + " Answer." and p["images"] == [q["image"]]
        assert p["label"] == q["label"] == ("yes" if present else "no")
        assert (p["chosen"], p["rejected"]) == (("Yes", "No") if present else ("No", "Yes"))
    assert [p["object"] for p in pairs if p["images"] == ["e.png"]] == ["cat", "dog"]


def test_cli_writes_a_trainable_pair_file(tmp_path, capsys):
    instances = write_coco(tmp_path / "coco")
    out = tmp_path / "pairs" / "existence.jsonl"
    assert main(["build-pairs", "existence", "--annotations", str(instances), "--images",
                 str(tmp_path / "coco" / "images"), "--out", str(out), "--num-images", "3", "--yes", "yes",
                 "--no", "no", "--seed", "1"]) == 0
    assert "6 pairs (adversarial, yes 50%) from 3 images" in capsys.readouterr().out
    records, kind = load_preference_data(out)
    assert kind == "pair" and len(records) == 6
    for r in records:  # image paths are relative to the pair file, as the trainer resolves them
        assert (out.parent / r["images"][0]).resolve().parent == (tmp_path / "coco" / "images").resolve()
        assert {r["chosen"], r["rejected"]} == {"yes", "no"}


def test_bad_inputs_are_named(tmp_path, capsys):
    with pytest.raises(DataError, match="the yes answer 'Yes' and the no answer 'yes' are the same"):
        build_existence_pairs(OBJECTS, yes="Yes", no="yes")
    instances = write_coco(tmp_path / "coco")
    (tmp_path / "empty").mkdir()
    assert main(["build-pairs", "existence", "--annotations", str(instances), "--images", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert f"no image of {instances} is in {tmp_path / 'empty'}" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
