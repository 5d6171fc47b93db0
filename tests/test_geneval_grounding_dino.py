"""Grounding DINO as the GenEval detector (mmalign/evaluation/geneval_detectors.py::GroundingDinoDetector):
class tokens written by hand, detections of a model with chosen outputs computed by hand, a tiny
random transformers Grounding DINO against the official post-processing, and `mmalign eval
geneval --detector grounding-dino` from a hub id with the network off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmalign.cli import main
from mmalign.evaluation.geneval_detectors import GroundingDinoDetector

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "circle", "square", "tri", "##ang", "##le",
         "ring", "bar", "cross", "diamond", "triangle"]


def tiny_processor():
    from transformers import BertTokenizerFast, GroundingDinoImageProcessor, GroundingDinoProcessor

    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    images = GroundingDinoImageProcessor(size={"shortest_edge": 32, "longest_edge": 48})
    return GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer)


def save_tiny_grounding_dino(path: Path) -> Path:
    """A random Grounding DINO (Swin 4 stages width 8, BERT 1 layer width 16, d_model 64, 10 queries,
    text length 32) and its processor (BERT word-piece vocabulary `WORDS`), saved to `path`."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, num_queries=10, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, d_model=64, num_feature_levels=3, encoder_n_points=1,
                                 decoder_n_points=1, max_text_len=32)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


def test_class_tokens_are_the_name_spans():
    detector = GroundingDinoDetector(model=torch.nn.Identity(), processor=tiny_processor())
    text, owner = detector.class_tokens(["Red Circle", "triangle", "square"])
    assert text == "red circle. triangle. square."
    # [CLS] red circle . triangle . square . [SEP]  ("triangle" is one word of the vocabulary)
    assert owner == [-1, 0, 0, -1, 1, -1, 2, -1, -1]
    _, owner = detector.class_tokens(["triang", "ring"])  # word pieces tri ##ang of one class
    assert owner == [-1, 0, 0, -1, 1, -1, -1]


class FixedOutputs(torch.nn.Module):
    """Returns chosen logits (1, Q, 32) and boxes (1, Q, 4) whatever the input."""

    def __init__(self, logits, boxes):
        super().__init__()
        self.logits, self.boxes = torch.tensor([logits]), torch.tensor([boxes])

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits, pred_boxes=self.boxes)


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


def test_detections_of_chosen_outputs_equal_hand_computed():
    from PIL import Image

    # text "circle. square." -> [CLS] circle . square . [SEP] = positions 0..5, padding -inf after
    def row(*probs):
        return [_logit(p) for p in probs] + [float("-inf")] * 26

    logits = [row(0.1, 0.9, 0.2, 0.3, 0.1, 0.1),     # circle 0.9
              row(0.99, 0.2, 0.95, 0.4, 0.1, 0.97),  # [CLS], "." and [SEP] win, among the classes: square 0.4
              row(0.01, 0.02, 0.5, 0.03, 0.01, 0.6)]  # best class token 0.03 < min_score: dropped
    boxes = [[0.5, 0.5, 0.5, 0.25], [0.25, 0.75, 0.1, 0.5], [0.5, 0.5, 1.0, 1.0]]
    detector = GroundingDinoDetector(model=FixedOutputs(logits, boxes), processor=tiny_processor(), min_score=0.05)
    found = detector.detect(Image.new("RGB", (40, 32)), ["circle", "square"])
    assert sorted(found) == ["circle", "square"]
    (circle,), (square,) = found["circle"], found["square"]
    # (cx, cy, w, h) relative -> pixels of the 40×32 image
    assert circle.box == pytest.approx((10.0, 12.0, 30.0, 20.0)) and circle.score == pytest.approx(0.9)
    assert square.box == pytest.approx((8.0, 16.0, 12.0, 32.0)) and square.score == pytest.approx(0.4)


def test_tiny_grounding_dino_agrees_with_the_official_post_processing(tmp_path):
    from PIL import Image

    path = save_tiny_grounding_dino(tmp_path / "gdino")
    detector = GroundingDinoDetector(str(path), min_score=0.0)
    image = Image.new("RGB", (40, 32), (200, 40, 40))
    found = detector.detect(image, ["red circle", "square"])
    inputs = detector.processor(images=image, text="red circle. square.", return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    official = detector.processor.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[(32, 40)])[0]
    probs = torch.sigmoid(out.logits[0].double())                  # (10, 32)
    spans = {"red circle": [1, 2], "square": [4]}                  # [CLS] red circle . square . [SEP]
    got = sorted((k, tuple(round(v, 3) for v in d.box), round(d.score, 5)) for k, ds in found.items() for d in ds)
    expected, same_as_official = [], 0
    for q in range(10):
        best = {k: probs[q, j].max().item() for k, j in spans.items()}
        name = max(best, key=best.get)
        expected.append((name, tuple(round(v, 3) for v in official["boxes"][q].tolist()), round(best[name], 5)))
        if probs[q].argmax().item() in spans[name]:  # its best token is a class token: the official score
            same_as_official += 1
            assert best[name] == pytest.approx(official["scores"][q].item(), rel=1e-5)
    assert got == sorted(expected)
    assert same_as_official >= 1, "the random model's best token is never a class token: the check is empty"


def test_eval_geneval_with_grounding_dino_from_a_hub_id_offline(tmp_path, monkeypatch):
    from test_geneval import write_layout

    from mmalign.evaluation.geneval import summary
    from mmalign.toyworld.models import build_scorer

    cache, commit = tmp_path / "hub", "c" * 40
    storage = cache / "models--tinyorg--tiny-gdino"
    save_tiny_grounding_dino(storage / "snapshots" / commit)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    clip = tmp_path / "clip"
    for part in build_scorer(seed=0):  # a tiny CLIP for the colour step
        part.save_pretrained(clip)
    images, out = write_layout(tmp_path / "images"), tmp_path / "g.json"
    args = ["eval", "geneval", "--images", str(images), "--detector", "grounding-dino", "--detector-path",
            "tinyorg/tiny-gdino", "--clip", str(clip), "--threshold", "0.3", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["counts"]["images"] == 10 and result["settings"]["detector"] == "grounding-dino"
    assert result["metrics"] == pytest.approx(summary(result["images_checked"]))
    shutil.rmtree(cache)  # a second run reads every verdict from the cache: no model is loaded
    assert main(args) == 0 and json.loads(out.read_text())["metrics"] == result["metrics"]
