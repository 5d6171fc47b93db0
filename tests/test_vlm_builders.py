"""VLM pair builders: `build-pairs corrupt` (rejected = the model's answer on a corrupted image)
and `build-pairs onpolicy` (least vs most hallucinated sampled answer), with a tiny LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mmalign.builders.onpolicy as onpolicy
from mmalign.builders.corrupt import corrupted_records
from mmalign.builders.onpolicy import build_onpolicy_pairs, pick_pair
from mmalign.data.media import load_image
from mmalign.evaluation.objects import ObjectVocabulary


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from mmalign.toyvlm import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from mmalign.toyvlm import make_shape_pairs

    return make_shape_pairs(4, 2, tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> ObjectVocabulary:
    path = tmp_path_factory.mktemp("vocab") / "shapes.txt"
    path.write_text("circle, ring\nsquare, box\ntriangle\n")
    return ObjectVocabulary.load(path)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corrupt_builder_rejects_the_answer_on_the_corrupted_image(llava_dir, shapes, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.cli import main
    from mmalign.generate.text import generate_answers

    out = tmp_path / "pairs"
    assert main(["build-pairs", "corrupt", str(shapes), "--model", str(llava_dir), "--out", str(out),
                 "--chosen", "ground_truth", "--corruption", "mask", "--seed", "3", "--max-new-tokens", "3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rows, source = read(out / "pairs.jsonl"), read(shapes)
    kept = [r["source_index"] for r in rows]
    assert line.startswith(f"[mmalign] build-pairs corrupt: {len(rows)} pairs kept of 4 prompts")
    # the rejected answers are the model's answers on the SAME seeded corrupted images
    model, processor = AutoModelForImageTextToText.from_pretrained(llava_dir), AutoProcessor.from_pretrained(llava_dir)
    corrupted = corrupted_records(source, "mask", {"ratio": 0.3, "patch": 1}, 3, [shapes.parent])
    expected = generate_answers(model, processor, corrupted, max_new_tokens=3)
    for r in rows:
        i = r["source_index"]
        assert r["rejected"] == expected[i] and r["chosen"] == source[i]["chosen"]
        assert r["prompt"] == source[i]["prompt"] and r["chosen_source"] == "ground_truth"
        assert r["corruption"] == "mask" and r["corruption_params"] == {"ratio": 0.3, "patch": 1}
        clean = load_image(r["images"][0], "x", out)  # referenced relative to the jsonl
        assert np.array_equal(np.asarray(clean), np.asarray(load_image(source[i]["images"][0], "x", shapes.parent)))
    dropped = [i for i in range(4) if i not in kept]
    assert all(expected[i].strip() in ("", source[i]["chosen"]) for i in dropped)
    # the corrupted image really is masked: 30% of the 32x32 pixels black
    assert (np.asarray(corrupted[0]["images"][0]).sum(-1) == 0).sum() >= round(0.3 * 1024)


def scripted_answers(script: dict[int, str]):
    """A generate_answers stand-in answering by seed (checks the seeds the builder passes)."""
    def generate(model, processor, records, *, seeds, do_sample, **kwargs):
        assert do_sample and len(seeds) == len(records)
        return [script[s] for s in seeds]

    return generate


def test_onpolicy_pairs_fewest_hallucinations_then_recall(tmp_path, vocab, monkeypatch):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{"images": ["a.png"], "prompt": "p0", "objects": ["circle"]},
               {"images": ["a.png"], "prompt": "p1", "objects": ["circle", "square"]},
               {"images": ["a.png"], "prompt": "p2", "objects": ["circle"]},
               {"images": ["a.png"], "prompt": "p3", "objects": ["circle"]}]
    seed = lambda i, k: onpolicy.sample_seed(0, i, k)  # noqa: E731
    script = {seed(0, 0): "a red circle and a blue box", seed(0, 1): "a red circle",        # 1 vs 0 hallucinated
              seed(0, 2): "a ring , a square and a triangle",                                # 2 hallucinated
              seed(1, 0): "a circle", seed(1, 1): "a circle and a square", seed(1, 2): "a circle",  # recall .5 / 1
              seed(2, 0): "a circle", seed(2, 1): "the circle", seed(2, 2): "one ring",     # all tied
              seed(3, 0): "", seed(3, 1): "a box", seed(3, 2): " "}                          # 1 non-empty
    monkeypatch.setattr("mmalign.generate.text.generate_answers", scripted_answers(script))
    path, counts = build_onpolicy_pairs(None, None, records, tmp_path / "out", num_samples=3, roots=[tmp_path],
                                        score=onpolicy.annotation_scorer(vocab), vocab=vocab)
    assert counts == {"prompts": 4, "kept": 2, "ties": 1, "empty": 1}
    first, second = read(path)
    assert (first["chosen"], first["rejected"]) == ("a red circle", "a ring , a square and a triangle")
    assert first["hallucinations"] == [0.0, 2.0] and first["hallucinated_objects"] == [[], ["square", "triangle"]]
    assert first["seeds"] == [seed(0, 1), seed(0, 2)]
    assert (second["chosen"], second["rejected"]) == ("a circle and a square", "a circle")
    assert second["recall"] == [1.0, 0.5]
    assert first["images"] == ["../a.png"]  # relative to the jsonl


def test_pick_pair_and_missing_annotations(vocab):
    assert pick_pair([(1, 0.5), (0, 0.5), (0, 1.0)]) == (2, 0)
    assert pick_pair([(0, 1.0), (0, 1.0)]) is None
    from mmalign.data.preference import DataError

    with pytest.raises(DataError, match="row 4 has no 'objects' annotation"):
        onpolicy.annotation_scorer(vocab)({"_index": 4}, "a circle")
    with pytest.raises(DataError, match=r"row 1: objects \['dog'\] are not vocabulary categories"):
        onpolicy.annotation_scorer(vocab)({"_index": 1, "objects": ["dog"]}, "a circle")


def test_onpolicy_cli_with_the_tiny_llava(llava_dir, shapes, vocab, tmp_path, capsys):
    from mmalign.cli import main

    data = shapes.parent / "with_objects.jsonl"
    data.write_text("".join(json.dumps(dict(r, objects=[r["chosen"].split()[-1]])) + "\n" for r in read(shapes)))
    out = tmp_path / "onpolicy"
    argv = ["build-pairs", "onpolicy", str(data), "--model", str(llava_dir), "--out", str(out), "--num-samples", "3",
            "--max-new-tokens", "4", "--vocabulary", vocab.source]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rows = read(out / "pairs.jsonl")
    # a random tiny model, seeded: some prompts tie; the summary accounts for every prompt
    assert f"{len(rows)} pairs kept of 4 prompts ({4 - len(rows)} dropped: best and worst answers tied, 0 dropped" in line
    assert rows, "the seeded tiny model gives at least one usable pair"
    for r in rows:
        assert r["chosen"].strip() and r["rejected"].strip()
        assert (r["hallucinations"][0], -r["recall"][0]) < (r["hallucinations"][1], -r["recall"][1])
        assert r["hallucinations"][1] == len(r["hallucinated_objects"][1])
    assert main(argv) == 0 and read(out / "pairs.jsonl") == rows  # seeded: a rerun writes the same pairs
