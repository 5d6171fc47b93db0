"""Detectors for the GenEval checks (`geneval.Detector`):

- `ToyWorldDetector`: the toy world's exact detector. Every pixel of a toy image has exactly a
  palette colour (`toyworld.checker.palette_labels`); each 8-connected region of one colour is
  re-drawn as every shape with the region's centre and half-width, and named after the shape
  whose drawing equals the region (score = IoU of the best drawing: 1.0 for a clean render).
  Colours are read off the pixels. No weights, so the whole GenEval path is testable.
- `OpenVocabDetector`: a transformers OWLv2 / OWL-ViT zero-shot object detector from a local
  folder or hub id, queried with "a photo of a {class}";
- `GroundingDinoDetector`: a transformers Grounding DINO from a local folder or hub id, queried
  with the class names ("circle. square."), each box named after the class whose tokens hold
  its best text token (see the class);
  both take colours from `ClipColourClassifier` (GenEval's zero-shot colour step: CLIP, 10 colours, its 3 templates, on
  the box crop; GenEval also pastes the instance mask on grey, which box detectors lack).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np

from mmalign.errors import ConfigError
from mmalign.evaluation.geneval import COLORS, Detection

COLOUR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of a (H, W) bool mask, each as a bool mask, in raster order of their first pixel."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        region, queue = np.zeros_like(seen), deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            region[y, x] = True
            for ny in range(max(y - 1, 0), min(y + 2, h)):
                for nx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(region)
    return out


class ToyWorldDetector:
    """Exact detector of toy-world images (see the module docstring); classes are shape names."""

    def _shape(self, region: np.ndarray, colour: str) -> tuple[str, float]:
        """The shape whose drawing best matches `region` (IoU), over the centres and half-sizes
        that put one edge of the drawing on the region's box (an object cut by the image border
        keeps its other edge)."""
        from mmalign.toyworld.world import SHAPES, Obj, object_mask

        ys, xs = np.nonzero(region)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        best, best_iou = SHAPES[0], -1.0
        for shape in SHAPES:
            for r in range(max(1, (x1 - x0) // 2), max(2, (x1 - x0) // 2 + 1, region.shape[0] // 2)):
                half_height = max(1, r // 2) if shape == "bar" else r
                for cx in {x0 + r, x1 - r}:
                    for cy in {y0 + half_height, y1 - half_height}:
                        drawn = object_mask(Obj(colour, shape, cx, cy, r), region.shape[0])
                        iou = float((drawn & region).sum() / (drawn | region).sum())
                        if iou == 1.0:
                            return shape, 1.0
                        if iou > best_iou:
                            best, best_iou = shape, iou
        return best, best_iou

    def detect(self, image: Any, classes: Sequence[str]) -> dict[str, list[Detection]]:
        from mmalign.toyworld.checker import PALETTE_NAMES, palette_labels

        labels = palette_labels(image)
        if labels.shape[0] != labels.shape[1]:
            raise ConfigError("toyworld detector: toy-world images are square")
        out: dict[str, list[Detection]] = {}
        for index, colour in enumerate(PALETTE_NAMES[1:], start=1):
            for region in components(labels == index):
                shape, iou = self._shape(region, colour)
                ys, xs = np.nonzero(region)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                out.setdefault(shape, []).append(Detection(box, iou, colour))
        return {k: v for k, v in out.items() if k in classes}

    def colours(self, image: Any, detections: Sequence[Detection], classname: str) -> list[str]:
        return [d.colour or "" for d in detections]


def crop_box(box: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer crop of a float box inside a (W, H) image, at least one pixel each way."""
    w, h = size
    x0, y0 = min(max(int(np.floor(box[0])), 0), w - 1), min(max(int(np.floor(box[1])), 0), h - 1)
    return x0, y0, max(min(int(np.ceil(box[2])), w), x0 + 1), max(min(int(np.ceil(box[3])), h), y0 + 1)


class ClipColourClassifier:
    """GenEval's colour step with a transformers CLIP folder: class embedding of colour c =
    normalised mean of the normalised text embeddings of the 3 templates; a crop's colour =
    argmax of cosine similarity (clip_benchmark's zero_shot_classifier)."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        self.device, self.weights = device, {}

    def _classifier(self, classname: str) -> Any:
        import torch

        from mmalign.scoring.base import features

        if classname not in self.weights:
            rows = []
            for c in COLORS:
                texts = [t.format(c=c, obj=classname) for t in COLOUR_TEMPLATES]
                tok = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
                with torch.no_grad():
                    emb = torch.nn.functional.normalize(features(self.model.get_text_features(**tok)), dim=-1).mean(0)
                rows.append(torch.nn.functional.normalize(emb, dim=-1))
            self.weights[classname] = torch.stack(rows)  # (10, D)
        return self.weights[classname]

    def __call__(self, image: Any, detections: Sequence[Detection], classname: str) -> list[str]:
        import torch

        from mmalign.scoring.base import features

        if not detections:
            return []
        image = image.convert("RGB")
        crops = [image.crop(crop_box(d.box, image.size)) for d in detections]
        pixels = self.processor(images=crops, return_tensors="pt").to(self.device)
        with torch.no_grad():
            feats = torch.nn.functional.normalize(features(self.model.get_image_features(**pixels)), dim=-1)
        return [COLORS[i] for i in (feats @ self._classifier(classname).T).argmax(-1).tolist()]


class OpenVocabDetector:
    """A transformers OWLv2 / OWL-ViT zero-shot detector from a local folder.
    `detect` asks for every class at once and keeps all boxes with score > `min_score` (GenEval's
    thresholds are applied afterwards); `colours` needs `clip` (a local CLIP folder)."""

    def __init__(self, path: str | None = None, *, clip: str | None = None, device: str = "cpu",
                 min_score: float = 0.05, model: Any = None, processor: Any = None,
                 colour_classifier: Any = None) -> None:
        if model is None:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

            from mmalign.scoring.base import require_path

            folder = require_path(path, "geneval detector folder (--detector-path)") if path else None
            if folder is None:
                raise ConfigError("geneval detector: give a local OWLv2 / OWL-ViT folder (--detector-path)")
            model = AutoModelForZeroShotObjectDetection.from_pretrained(folder)
            processor = AutoProcessor.from_pretrained(folder)
            if not type(model).__name__.startswith(("Owlv2", "OwlViT")):
                raise ConfigError(f"geneval detector {folder}: {type(model).__name__} is not OWLv2 / OWL-ViT")
        self.model, self.processor = model.to(device).eval(), processor
        self.device, self.min_score = device, float(min_score)
        self.colour_classifier = colour_classifier or (ClipColourClassifier(clip, device) if clip else None)

    def detect(self, image: Any, classes: Sequence[str]) -> dict[str, list[Detection]]:
        import torch

        image = image.convert("RGB")
        queries = [f"a photo of a {c}" for c in classes]
        inputs = self.processor(text=[queries], images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        side = max(image.size)  # OWLv2 pads to a square: boxes are relative to the padded image
        size = (side, side) if type(self.model).__name__.startswith("Owlv2") else image.size[::-1]
        result = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=self.min_score, target_sizes=torch.tensor([size]))[0]
        out: dict[str, list[Detection]] = {}
        for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()):
            out.setdefault(classes[int(label)], []).append(Detection(tuple(box), float(score)))
        return out

    def colours(self, image: Any, detections: Sequence[Detection], classname: str) -> list[str]:
        if self.colour_classifier is None:
            raise ConfigError("geneval: colour prompts need a colour classifier: give --clip (a local CLIP folder)")
        return self.colour_classifier(image, detections, classname)


class GroundingDinoDetector:
    """Grounding DINO (transformers `GroundingDinoForObjectDetection`) from a local folder or hub id.

    Text = the class names lower-cased and joined "c_1. c_2. ... c_K." (the processor's own merge);
    class k owns the text tokens whose character offsets fall inside its name. With
    p[q, j] = sigmoid(logits[q, j]) of query box q and text token j, T_k the tokens of class k:

        score_q = max_k max_{j in T_k} p[q, j]       class_q = the k attaining it

    and box q is kept when score_q > `min_score` (the box threshold; GenEval's thresholds apply
    afterwards). score_q is the official post-processing's box score (max over all tokens)
    whenever the best token is a class token; the class replaces its phrase decoding (tokens
    above a text threshold, which can join two classes' words or cut one), and the separators
    "." and special tokens name nothing. Boxes are (x0, y0, x1, y1) pixels of the input image."""

    def __init__(self, path: str | None = None, *, clip: str | None = None, device: str = "cpu",
                 min_score: float = 0.05, model: Any = None, processor: Any = None,
                 colour_classifier: Any = None) -> None:
        if model is None:
            from transformers import AutoProcessor, GroundingDinoForObjectDetection

            from mmalign.scoring.base import require_path

            if not path:
                raise ConfigError("geneval detector: give a local Grounding DINO folder or hub id (--detector-path)")
            folder = require_path(path, "geneval detector folder (--detector-path)")
            model = GroundingDinoForObjectDetection.from_pretrained(folder)
            processor = AutoProcessor.from_pretrained(folder)
        self.model, self.processor = model.to(device).eval(), processor
        self.device, self.min_score = device, float(min_score)
        self.colour_classifier = colour_classifier or (ClipColourClassifier(clip, device) if clip else None)

    def class_tokens(self, classes: Sequence[str]) -> tuple[str, list[int]]:
        """(text, owner): the merged text and, per text token, the index of its class or -1."""
        names = [c.strip().lower() for c in classes]
        text = ". ".join(names) + "."
        spans, start = [], 0
        for name in names:
            spans.append((start, start + len(name)))
            start += len(name) + 2
        offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        owner = [next((k for k, (a, b) in enumerate(spans) if a <= lo and hi <= b and hi > lo), -1)
                 for lo, hi in offsets]
        return text, owner

    def detect(self, image: Any, classes: Sequence[str]) -> dict[str, list[Detection]]:
        import torch

        image = image.convert("RGB")
        text, owner = self.class_tokens(classes)
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        if inputs["input_ids"].shape[1] != len(owner):
            raise ConfigError(f"geneval detector: the prompt {text!r} is longer than the model's text length")
        with torch.no_grad():
            outputs = self.model(**inputs)
        probs = torch.sigmoid(outputs.logits[0, :, :len(owner)].double())  # (Q, L)
        mask = torch.tensor([k >= 0 for k in owner])
        scores, best = probs.masked_fill(~mask, -1.0).max(-1)  # (Q,)
        w, h = image.size
        cx, cy, bw, bh = outputs.pred_boxes[0].double().unbind(-1)
        boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        out: dict[str, list[Detection]] = {}
        for q in torch.nonzero(scores > self.min_score).flatten().tolist():
            out.setdefault(classes[owner[best[q]]], []).append(Detection(tuple(boxes[q].tolist()),
                                                                         float(scores[q])))
        return out

    def colours(self, image: Any, detections: Sequence[Detection], classname: str) -> list[str]:
        if self.colour_classifier is None:
            raise ConfigError("geneval: colour prompts need a colour classifier: give --clip (a local CLIP folder)")
        return self.colour_classifier(image, detections, classname)


def toyworld_metadata(prompts: Sequence[str]) -> list[dict]:
    """GenEval "colors" metadata of the toy world's image prompts "a <colour> <shape>": one object
    of that shape, of that colour (score a `mmalign generate` manifest with the geneval scorer)."""
    from mmalign.toyworld.checker import parse_caption

    out = []
    for prompt in prompts:
        colour, shape = parse_caption(prompt)
        out.append({"tag": "colors", "prompt": prompt, "include": [{"class": shape, "count": 1, "color": colour}]})
    return out


def load_detector(name: str, path: str | None = None, clip: str | None = None, device: str = "cpu") -> Any:
    """'toyworld' (exact, nothing loaded), 'owlv2' (an OWLv2 / OWL-ViT folder or hub id) or
    'grounding-dino' (a Grounding DINO folder or hub id)."""
    if name == "toyworld":
        return ToyWorldDetector()
    if name == "owlv2":
        return OpenVocabDetector(path, clip=clip, device=device)
    if name == "grounding-dino":
        return GroundingDinoDetector(path, clip=clip, device=device)
    raise ConfigError(f"geneval detector {name!r}: expected toyworld, owlv2 or grounding-dino")
