"""GenEval (Ghosh et al. 2023) image checks, ported from `djghosh13/geneval`
`evaluation/evaluate_images.py` and `summary_scores.py` (@af4902f, MIT), over a detector interface.

A prompt's metadata (`prompts/evaluation_metadata.jsonl`): {"tag", "prompt", "include":
[{"class", "count", "color"?, "position": [relation, group]?}], "exclude": [{"class", "count"}]}.
Detections per class: boxes with score > 0.3 (> 0.9 for "counting" prompts), highest score
first, at most 16 per class, no NMS. Then:

- include clauses AND: the top-`count` boxes of the class must exist; `color`: at least
  `count` of them classified as that colour (GenEval: CLIP ViT-L-14 zero-shot over COLORS);
  `position [rel, k]` (only when the clause matched so far): every box vs every box of the
  k-th include clause (which must have matched) must satisfy `rel` under `relative_position`;
- exclude clauses OR: the image fails when the class has >= `count` boxes (counting prompts
  exclude count + 1, so the count is exact).

relative_position(A, B): centres c, sizes d of the boxes (x0, y0, x1, y1), o = c_A − c_B,
o' = max(|o| − 0.1 (d_A + d_B), 0) · sign(o); no relation when every |o'| < 1e-3, else
(dx, dy) = o' / ‖o‖: dx < −0.5 "left of", dx > 0.5 "right of", dy < −0.5 "above", dy > 0.5 "below".

Scores (summary_scores.py): per task (tag) the fraction of correct images; overall = the mean of
the task accuracies; also the fractions of correct images and of prompts with >= 1 correct image.

The detector is pluggable (`Detector`): GenEval's own is mmdet Mask2Former (not wrapped here);
`geneval_detectors.py` has transformers OWLv2 / OWL-ViT and Grounding DINO detectors with a
CLIP colour classifier, and the toy world's exact detector. With another detector the numbers are
"GenEval-style", not comparable with published GenEval scores: name the detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from mmalign.errors import DataError

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    """One detected object: box (x0, y0, x1, y1) in pixels, confidence, and its colour when the
    detector knows it exactly (the toy world), else None (a colour classifier decides)."""

    box: tuple[float, float, float, float]
    score: float
    colour: str | None = None


@runtime_checkable
class Detector(Protocol):
    """`detect(image, classes) -> {class: [Detection]}` (any score, any order: thresholds are
    applied here); `colours(image, detections, classname) -> [colour of each]`."""

    def detect(self, image: Any, classes: Sequence[str]) -> dict[str, list[Detection]]: ...

    def colours(self, image: Any, detections: Sequence[Detection], classname: str) -> list[str]: ...


def keep_detections(raw: Mapping[str, Sequence[Detection]], tag: str, threshold: float = THRESHOLD,
                    counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS
                    ) -> dict[str, list[Detection]]:
    """Per class: score > threshold (counting_threshold for "counting"), by score descending, first max_objects."""
    limit = counting_threshold if tag == "counting" else threshold
    out = {}
    for name, dets in raw.items():
        kept = sorted((d for d in dets if d.score > limit), key=lambda d: -d.score)[:max_objects]
        if kept:
            out[name] = kept
    return out


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A to B (see the module docstring), as GenEval's `relative_position`."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {r for r, hit in zip(RELATIONS, (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)) if hit}


Colours = Callable[[Sequence[Detection], str], list[str]]


def _position_ok(req: dict[str, Any], found: list[Detection], groups: list[list[Detection] | None],
                 reasons: list[str]) -> bool:
    relation, k = req["position"]
    if k >= len(groups) or groups[k] is None:
        reasons.append(f"no target for {req['class']} to be {relation}")
        return False
    for obj in found:
        for target in groups[k]:
            rels = relative_position(obj, target)
            if relation not in rels:
                reasons.append(f"expected {req['class']} {relation} target, found {' and '.join(sorted(rels))} target")
                return False
    return True


def evaluate(metadata: Mapping[str, Any], detected: Mapping[str, list[Detection]], colours: Colours
             ) -> tuple[bool, list[str]]:
    """(correct, reasons) of one image's kept detections against a prompt's metadata (GenEval's `evaluate`)."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = detected.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                got = colours(found, name)
                if got.count(req["color"]) < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {got.count(req['color'])}")
            if "position" in req and matched:
                matched = _position_ok(req, found, groups, reasons)
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(detected.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, reasons


def classes_of(metadata: Mapping[str, Any]) -> list[str]:
    """The classes a prompt's clauses name, in order, without repeats."""
    names = [r["class"] for key in ("include", "exclude") for r in metadata.get(key, [])]
    return list(dict.fromkeys(names))


def check_image(image: Any, metadata: Mapping[str, Any], detector: Detector, **thresholds: float
                ) -> dict[str, Any]:
    """{"correct", "reasons", "detected": {class: [[x0, y0, x1, y1, score], ...]}} of one image."""
    raw = detector.detect(image, classes_of(metadata))
    detected = keep_detections(raw, metadata.get("tag", ""), **thresholds)
    correct, reasons = evaluate(metadata, detected, lambda dets, name: detector.colours(image, dets, name))
    return {"correct": bool(correct), "reasons": reasons,
            "detected": {k: [[*map(float, d.box), float(d.score)] for d in v] for k, v in detected.items()}}


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """GenEval's summary of per-image rows {"tag", "prompt_index", "correct"}: per-task accuracy,
    overall = mean over tasks (in order of first appearance), correct images, correct prompts."""
    if not rows:
        raise DataError("geneval: no images to summarise")
    tasks: dict[str, list[bool]] = {}
    prompts: dict[Any, list[bool]] = {}
    for r in rows:
        tasks.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts.setdefault(r["prompt_index"], []).append(bool(r["correct"]))
    per_task = {t: sum(v) / len(v) for t, v in tasks.items()}
    return {"Overall": sum(per_task.values()) / len(per_task), **per_task,
            "correct images": sum(bool(r["correct"]) for r in rows) / len(rows),
            "correct prompts": sum(any(v) for v in prompts.values()) / len(prompts)}


# -- mmalign eval geneval ------------------------------------------------------------------------
def read_metadata(path: Any) -> dict[str, Any]:
    """One prompt's metadata ({"tag", "prompt", "include", "exclude"?}), checked."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable GenEval metadata json ({type(e).__name__})") from e
    if not isinstance(data, dict) or "tag" not in data or not isinstance(data.get("include"), list):
        raise DataError(f"{path}: GenEval metadata needs 'tag' and an 'include' list")
    for req in data["include"] + data.get("exclude", []):
        if not isinstance(req, dict) or "class" not in req or not isinstance(req.get("count"), int):
            raise DataError(f"{path}: every include / exclude clause needs 'class' and an integer 'count'")
    return data


def image_items(root: Any) -> list[tuple[str, Any, dict[str, Any]]]:
    """(key "NNNNN/samples/NNNN.png", path, metadata) of GenEval's layout: ROOT/<digits>/metadata.jsonl
    and ROOT/<digits>/samples/<digits>.png (other files are skipped, as evaluate_images.py does)."""
    import re
    from pathlib import Path

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"geneval: image folder not found: {root}")
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        metadata = read_metadata(folder / "metadata.jsonl")
        for image in sorted((folder / "samples").glob("*.png")):
            if re.fullmatch(r"\d+\.png", image.name):
                items.append((f"{folder.name}/samples/{image.name}", image, metadata))
    if not items:
        raise DataError(f"geneval: no <digits>/samples/<digits>.png images under {root} (GenEval's layout)")
    return items
