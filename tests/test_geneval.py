"""GenEval-style checks (mmalign/evaluation/geneval*.py, scoring/geneval.py): the rules of
djghosh13/geneval evaluate_images.py / summary_scores.py on hand-built detections (expected
values written by hand), the toy world's exact detector, `mmalign eval geneval` end to end with
a killed run resumed, and the scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.evaluation.geneval import Detection, evaluate, keep_detections, relative_position, summary


def box(x0, y0, x1, y1, score=1.0, colour=None) -> Detection:
    return Detection((x0, y0, x1, y1), score, colour)


@pytest.mark.parametrize("a,b,relations", [
    (box(0, 0, 10, 10), box(20, 0, 30, 10), {"left of"}),              # o=(-20,0): o'=(-18,0), dx=-0.9
    (box(20, 0, 30, 10), box(0, 0, 10, 10), {"right of"}),
    (box(0, 0, 10, 10), box(1, 0, 11, 10), set()),                     # |o|=1 < 0.1*(10+10): no relation
    (box(0, 0, 10, 10), box(20, 20, 30, 30), {"left of", "above"}),    # dx=dy=-18/28.28=-0.64
    (box(0, 0, 10, 10), box(20, 8, 30, 18), {"left of"}),              # (-18,-6)/21.54: dy=-0.28
    (box(0, 30, 10, 40), box(0, 0, 10, 10), {"below"}),
])
def test_relative_position_equals_hand_computed(a, b, relations):
    assert relative_position(a, b) == relations


def test_keep_detections_thresholds_order_and_cap():
    raw = {"orange": [box(0, 0, 1, 1, s) for s in (0.5, 0.95, 0.91, 0.92, 0.2)], "cup": [box(0, 0, 1, 1, 0.31)]}
    counting = keep_detections(raw, "counting")
    assert [d.score for d in counting["orange"]] == [0.95, 0.92, 0.91] and "cup" not in counting
    other = keep_detections(raw, "two_object")
    assert [d.score for d in other["orange"]] == [0.95, 0.92, 0.91, 0.5] and len(other["cup"]) == 1
    many = keep_detections({"cup": [box(0, 0, 1, 1, 0.4 + i / 100) for i in range(20)]}, "single_object")
    assert len(many["cup"]) == 16 and many["cup"][0].score == pytest.approx(0.59)


COUNT3 = {"tag": "counting", "include": [{"class": "orange", "count": 3}], "exclude": [{"class": "orange", "count": 4}]}


def by_colour(dets, name):
    return [d.colour for d in dets]


def test_counting_is_exact_through_the_exclude_clause():
    three = keep_detections({"orange": [box(0, 0, 1, 1, s) for s in (0.95, 0.92, 0.91, 0.5)]}, "counting")
    assert evaluate(COUNT3, three, by_colour)[0] is True            # the 0.5 box is under the 0.9 threshold
    four = keep_detections({"orange": [box(0, 0, 1, 1, 0.95)] * 4}, "counting")
    ok, reasons = evaluate(COUNT3, four, by_colour)
    assert not ok and reasons == ["expected orange<4, found 4"]
    two = keep_detections({"orange": [box(0, 0, 1, 1, 0.95)] * 2}, "counting")
    assert evaluate(COUNT3, two, by_colour) == (False, ["expected orange>=3, found 2"])


def test_colour_is_checked_on_the_most_confident_boxes_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}]}
    dets = keep_detections({"car": [box(0, 0, 5, 5, 0.5, "blue"), box(0, 0, 5, 5, 0.8, "red")]}, "colors")
    assert evaluate(meta, dets, by_colour)[0] is False               # top-1 is the red car
    dets = keep_detections({"car": [box(0, 0, 5, 5, 0.9, "blue"), box(0, 0, 5, 5, 0.8, "red")]}, "colors")
    assert evaluate(meta, dets, by_colour)[0] is True


def test_position_against_every_object_of_the_target_group():
    meta = {"tag": "position", "include": [{"class": "sink", "count": 1},
                                           {"class": "tie", "count": 1, "position": ["above", 0]}]}
    above = {"sink": [box(0, 50, 10, 60)], "tie": [box(0, 0, 10, 10)]}
    assert evaluate(meta, above, by_colour)[0] is True
    below = {"sink": [box(0, 0, 10, 10)], "tie": [box(0, 50, 10, 60)]}
    assert evaluate(meta, below, by_colour) == (False, ["expected tie above target, found below target"])
    no_sink = {"tie": [box(0, 0, 10, 10)]}
    ok, reasons = evaluate(meta, no_sink, by_colour)
    assert not ok and reasons == ["expected sink>=1, found 0", "no target for tie to be above"]
    # a clause that fails its colour is not position-checked (GenEval's `if ... and matched`)
    meta2 = {"tag": "x", "include": [{"class": "sink", "count": 1},
                                     {"class": "tie", "count": 1, "color": "red", "position": ["above", 0]}]}
    assert evaluate(meta2, {**below, "tie": [box(0, 50, 10, 60, 1.0, "blue")]}, by_colour)[1] == [
        "expected red tie>=1, found 0"]


def test_summary_is_the_mean_of_task_accuracies():
    rows = [{"tag": "a", "prompt_index": 0, "correct": True}, {"tag": "a", "prompt_index": 0, "correct": False},
            {"tag": "a", "prompt_index": 1, "correct": False}, {"tag": "b", "prompt_index": 2, "correct": True}]
    s = summary(rows)
    assert s["a"] == pytest.approx(1 / 3) and s["b"] == 1.0 and s["Overall"] == pytest.approx((1 / 3 + 1) / 2)
    assert s["correct images"] == 0.5 and s["correct prompts"] == pytest.approx(2 / 3)


# -- the toy world ------------------------------------------------------------------------------
def test_toy_detector_recovers_every_object_of_sampled_scenes():
    from mmalign.evaluation.geneval_detectors import ToyWorldDetector
    from mmalign.toyworld.world import SHAPES, render, sample_scenes

    detector = ToyWorldDetector()
    for scene in sample_scenes(30, 7, "train") + sample_scenes(10, 8, "test", kind="objects"):
        found = detector.detect(render(scene), SHAPES)
        assert sorted((k, d.colour) for k, v in found.items() for d in v) == sorted(
            (o.shape, o.colour) for o in scene.objects)


def _scene(*objects):
    from mmalign.toyworld.world import Obj, Scene, render

    return render(Scene(32, tuple(Obj(*o) for o in objects)))


PROMPTS = [  # (metadata, [(image objects, expected verdict)])
    ({"tag": "single_object", "prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]},
     [([("red", "circle", 8, 8, 5)], True), ([("blue", "square", 8, 8, 5)], False),
      ([("green", "circle", 24, 24, 4), ("red", "bar", 8, 24, 5)], True)]),
    ({"tag": "counting", "prompt": "a photo of two squares", "include": [{"class": "square", "count": 2}],
      "exclude": [{"class": "square", "count": 3}]},
     [([("red", "square", 8, 8, 5), ("blue", "square", 24, 24, 5)], True),
      ([("red", "square", 8, 8, 5), ("blue", "square", 24, 24, 5), ("red", "square", 8, 24, 5)], False)]),
    ({"tag": "colors", "prompt": "a photo of a blue triangle",
      "include": [{"class": "triangle", "count": 1, "color": "blue"}]},
     [([("yellow", "triangle", 8, 8, 5)], False), ([("blue", "triangle", 24, 8, 5)], True)]),
    ({"tag": "position", "prompt": "a photo of a square left of a circle",
      "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}]},
     [([("red", "square", 8, 8, 5), ("blue", "circle", 24, 8, 5)], True),
      ([("red", "circle", 8, 8, 5), ("blue", "square", 24, 8, 5)], False)]),
    ({"tag": "two_object", "prompt": "a photo of a circle and a ring",
      "include": [{"class": "circle", "count": 1}, {"class": "ring", "count": 1}]},
     [([("red", "circle", 8, 8, 5), ("blue", "cross", 24, 8, 5)], False)]),
]


def write_layout(root: Path) -> Path:
    """GenEval's layout: root/<5 digits>/metadata.jsonl + samples/<4 digits>.png."""
    for i, (meta, images) in enumerate(PROMPTS):
        folder = root / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for k, (objects, _) in enumerate(images):
            _scene(*objects).save(folder / "samples" / f"{k:04d}.png")
    (root / "notes").mkdir()  # not a prompt folder: skipped
    return root


def test_eval_geneval_on_toy_images_and_resume_after_a_kill(tmp_path, monkeypatch, capsys):
    import mmalign.evaluation.geneval as geneval

    images = write_layout(tmp_path / "images")
    out = tmp_path / "geneval.json"
    args = ["eval", "geneval", "--images", str(images), "--detector", "toyworld", "--out", str(out)]
    real, calls = geneval.check_image, []

    def killed_at_the_fifth(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(geneval, "check_image", killed_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(geneval, "check_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(args) == 0
    assert len(calls) == 10 + 1  # 4 before the kill, the killed one, then the 6 not yet checked
    result = json.loads(out.read_text())
    verdicts = [v for _, images_ in PROMPTS for _, v in images_]
    assert [r["correct"] for r in result["images_checked"]] == verdicts
    m = result["metrics"]
    assert m["single_object"] == pytest.approx(2 / 3) and m["counting"] == 0.5 and m["colors"] == 0.5
    assert m["position"] == 0.5 and m["two_object"] == 0.0
    assert m["Overall"] == pytest.approx((2 / 3 + 0.5 + 0.5 + 0.5 + 0.0) / 5)
    assert m["correct images"] == 0.5 and m["correct prompts"] == pytest.approx(4 / 5)
    assert result["benchmark"] == "geneval" and result["settings"]["detector"] == "toyworld"
    assert main(args) == 0 and len(calls) == 11  # everything cached


def test_geneval_scorer_is_the_strict_verdict(tmp_path):
    from mmalign.scoring import load_scorer

    meta = tmp_path / "metadata.jsonl"
    meta.write_text("".join(json.dumps(m) + "\n" for m, _ in PROMPTS))
    scorer = load_scorer(f"geneval={meta},detector=toyworld")
    conditions = [m["prompt"] for m, images in PROMPTS for _ in images]
    outputs = [_scene(*objects) for _, images in PROMPTS for objects, _ in images]
    expected = [float(v) for _, images in PROMPTS for _, v in images]
    assert scorer.score(conditions, outputs).tolist() == expected


def test_geneval_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["eval", "geneval", "--images", str(tmp_path), "--detector", "toyworld"]) == 2
    assert "GenEval's layout" in capsys.readouterr().err
    (tmp_path / "00000").mkdir()
    (tmp_path / "00000" / "metadata.jsonl").write_text('{"tag": "x"}')
    assert main(["eval", "geneval", "--images", str(tmp_path), "--detector", "toyworld"]) == 2
    assert "'include' list" in capsys.readouterr().err


# -- the transformers detector and colour step (tiny random models built from their configs) -----
def tiny_owlv2(path: Path) -> Path:
    """A random OWLv2 (32×32 input, patch 8) with a character-level CLIP tokenizer, saved to `path`
    (the start token must not be id 0: OWL masks queries whose first id is 0)."""
    import string

    import torch
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    vocab = {"<|endoftext|>": 0, "<|startoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    config = Owlv2Config(text_config=dict(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=32, bos_token_id=1,
                                          eos_token_id=0, pad_token_id=0),
                         vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).eval().save_pretrained(path)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}),
                   tokenizer=tokenizer).save_pretrained(path)
    return path


def test_owlv2_detector_boxes_are_pixels_of_the_padded_square(tmp_path):
    import torch
    from PIL import Image

    from mmalign.evaluation.geneval_detectors import OpenVocabDetector

    detector = OpenVocabDetector(str(tiny_owlv2(tmp_path / "owl")), min_score=0.0)
    image = Image.new("RGB", (40, 32), (128, 128, 128))           # padded to 40×40 by OWLv2
    found = detector.detect(image, ["circle", "square"])
    inputs = detector.processor(text=[["a photo of a circle", "a photo of a square"]], images=image, return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    scores, labels = torch.sigmoid(out.logits[0].double()).max(-1)   # (16,) best query of each box
    cx, cy, w, h = out.pred_boxes[0].double().unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * 40
    for k, name in enumerate(["circle", "square"]):
        expected = sorted((tuple(round(v, 3) for v in corners[i].tolist()), round(scores[i].item(), 4))
                          for i in range(16) if labels[i] == k)
        got = sorted((tuple(round(v, 3) for v in d.box), round(d.score, 4)) for d in found.get(name, []))
        assert got == expected
    assert sum(len(v) for v in found.values()) == 16


def test_clip_colour_step_and_eval_geneval_with_owlv2(tmp_path):
    import torch
    from PIL import Image

    from mmalign.evaluation.geneval import COLORS
    from mmalign.evaluation.geneval_detectors import COLOUR_TEMPLATES, ClipColourClassifier
    from mmalign.scoring.base import features
    from mmalign.toyworld.models import build_scorer

    model, processor = build_scorer(seed=0)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    clf = ClipColourClassifier(str(tmp_path / "clip"))
    weights = clf._classifier("circle").double()
    tok = processor(text=[t.format(c="red", obj="circle") for t in COLOUR_TEMPLATES], return_tensors="pt", padding=True,
                    truncation=True)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(features(model.get_text_features(**tok)).double(), dim=-1).mean(0)
    assert torch.allclose(weights[COLORS.index("red")], emb / emb.norm(), atol=1e-5)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    got = clf(image, [box(0, 0, 16, 16), box(8, 8, 30, 30)], "circle")
    assert len(got) == 2 and set(got) <= set(COLORS)

    images = write_layout(tmp_path / "images")
    out = tmp_path / "g.json"
    assert main(["eval", "geneval", "--images", str(images), "--detector", "owlv2", "--detector-path",
                 str(tiny_owlv2(tmp_path / "owl")), "--clip", str(tmp_path / "clip"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["counts"]["images"] == 10 and 0.0 <= result["metrics"]["Overall"] <= 1.0
    assert main(["eval", "geneval", "--images", str(images), "--detector", "owlv2", "--out", str(tmp_path / "h.json"),
                 "--detector-path", str(tmp_path / "nowhere")]) == 2


def test_geneval_scorer_on_a_generate_manifest_with_toy_metadata(tmp_path):
    from mmalign.evaluation.geneval_detectors import toyworld_metadata
    from mmalign.toyworld.world import Obj, Scene, render

    assert toyworld_metadata(["a red circle"]) == [
        {"tag": "colors", "prompt": "a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]}]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(m) + "\n" for m in toyworld_metadata(["a red circle", "a blue square"])))
    (tmp_path / "media").mkdir()
    drawn = [("a red circle", "red", "circle", 1.0), ("a red circle", "green", "circle", 0.0),
             ("a blue square", "blue", "square", 1.0), ("a blue square", "blue", "triangle", 0.0)]
    rows = []
    for i, (prompt, colour, shape, _) in enumerate(drawn):
        render(Scene(16, (Obj(colour, shape, 8, 8, 5),))).save(tmp_path / "media" / f"{i}.png")
        rows.append({"id": f"{i}", "prompt_index": i // 2, "prompt": prompt, "sample": i % 2, "seed": i,
                     "kind": "image", "path": f"media/{i}.png"})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", str(tmp_path), "--scorer", f"geneval={meta},detector=toyworld", "--device", "cpu"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["score_geneval"] for r in scored] == [v for *_, v in drawn]
