"""The procedural toy world: coloured shapes on a grey background, deterministic from a seed.

Two kinds of image, one vocabulary (METHODS.md §8, §9):

- ``objects``: 16×16, ONE filled circle / square / triangle in one of 4 colours, captioned
  "a red circle". The image side (text-to-image diffusion, the CLIP scorer, the checker).
- ``scenes``: 32×32, 1–3 objects of 7 shapes, one per cell of a 2×2 grid, captioned in
  reading order "a red circle and a blue square". The vision-language side (captioner,
  CHAIR/POPE). Shapes co-occur in partner pairs (square–circle, triangle–diamond,
  cross–ring; bar has none), as objects do in web photos.

Every object is drawn with integer geometry and no anti-aliasing, so each pixel has exactly
a palette colour: the checker (`checker.py`) can read images back exactly.

Held-out data, disjoint by construction:
- images: a scene's split is a hash of its exact geometry (`scene_key`): ~10 % of all
  possible scenes belong to ``test``, the rest to ``train``; a scene of one never appears in
  the other, whatever seeds are used;
- prompt combinations: scenes holding a colour–shape pair of `HELDOUT_COMBOS` (e.g. "a blue
  square") belong only to split ``combos`` (report it separately); `TRAIN_PROMPTS` of the
  image side leave them out.

`write_world(out_dir, n, seed, split)` writes PNGs, a jsonl index, COCO ``instances`` and
``captions`` json files. Same (kind, split, seed, n) -> byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 180, 60),
                                            "blue": (40, 70, 220), "yellow": (230, 210, 40)}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SHAPES: list[str] = ["circle", "square", "triangle", "diamond", "cross", "ring", "bar"]
IMAGE_SHAPES: list[str] = ["circle", "square", "triangle"]  # the 16×16 image side
PARTNER_PAIRS: list[tuple[str, str]] = [("square", "circle"), ("triangle", "diamond"), ("cross", "ring")]
PARTNER: dict[str, str] = {**{a: b for a, b in PARTNER_PAIRS}, **{b: a for a, b in PARTNER_PAIRS}}
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset({("blue", "square"), ("yellow", "triangle"),
                                                         ("green", "ring"), ("red", "cross")})
SPLITS: tuple[str, ...] = ("train", "test", "combos")
KINDS: dict[str, int] = {"objects": 16, "scenes": 32}  # kind -> image side in pixels
TEST_PERCENT = 10  # share of all scenes that are held out (split "test")
PROMPT = "describe the image ."  # the captioner's instruction
HELDOUT_SEED_START = 10_000  # sampling seeds >= this are for evaluation only (never for pairs)

TRAIN_PROMPTS: list[str] = [f"a {c} {s}" for s in IMAGE_SHAPES for c in COLOURS if (c, s) not in HELDOUT_COMBOS]
HELDOUT_PROMPTS: list[str] = [f"a {c} {s}" for s in IMAGE_SHAPES for c in COLOURS if (c, s) in HELDOUT_COMBOS]


@dataclass(frozen=True)
class Obj:
    """One object: colour and shape names, integer centre (cx, cy) and half-size r (pixels)."""

    colour: str
    shape: str
    cx: int
    cy: int
    r: int

    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """An image: its side in pixels and its objects in reading order."""

    size: int
    objects: tuple[Obj, ...]

    def caption(self) -> str:
        """'a red circle and a blue square' (reading order)."""
        return " and ".join(o.caption() for o in self.objects)

    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}


# -- drawing ------------------------------------------------------------------------------
def _polygon(o: Obj) -> list[tuple[int, int]] | None:
    cx, cy, r = o.cx, o.cy, o.r
    if o.shape == "triangle":
        return [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
    if o.shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def draw_object(pen: Any, o: Obj) -> None:
    """Draw `o` with a PIL ImageDraw (no anti-aliasing: every pixel is a palette colour)."""
    fill, (cx, cy, r) = COLOURS[o.colour], (o.cx, o.cy, o.r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if o.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif o.shape == "square":
        pen.rectangle(box, fill=fill)
    elif o.shape == "ring":
        pen.ellipse(box, outline=fill, width=2)
    elif o.shape == "bar":
        h = max(1, r // 2)
        pen.rectangle([cx - r, cy - h, cx + r, cy + h], fill=fill)
    elif o.shape == "cross":
        w = max(1, r // 3)
        pen.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        pen.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        pen.polygon(_polygon(o), fill=fill)


def render(scene: Scene) -> Any:
    """The scene as a `size`×`size` RGB PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for o in scene.objects:
        draw_object(pen, o)
    return image


def object_mask(o: Obj, size: int) -> Any:
    """(size, size) bool numpy mask of the pixels `o` covers when drawn alone."""
    import numpy as np

    image = render(Scene(size, (o,)))
    return np.asarray(image).astype(int).__sub__(BACKGROUND).any(-1)


# -- sampling -----------------------------------------------------------------------------
def scene_key(scene: Scene) -> str:
    """Canonical text of the exact geometry: equal keys <=> identical images."""
    return f"{scene.size}|" + ";".join(f"{o.colour},{o.shape},{o.cx},{o.cy},{o.r}" for o in scene.objects)


def split_of(scene: Scene) -> str:
    """"combos" if the scene holds a held-out colour–shape pair, else "test" for ~TEST_PERCENT %
    of scenes (by a hash of `scene_key`) and "train" for the others."""
    if any((o.colour, o.shape) in HELDOUT_COMBOS for o in scene.objects):
        return "combos"
    digest = int(hashlib.sha256(scene_key(scene).encode()).hexdigest(), 16)
    return "test" if digest % 100 < TEST_PERCENT else "train"


def _sample_object(rng: random.Random) -> Scene:
    """16×16: one of IMAGE_SHAPES, r in {4, 5, 6}, centre in 6..9 (always inside)."""
    o = Obj(rng.choice(list(COLOURS)), rng.choice(IMAGE_SHAPES), rng.randint(6, 9), rng.randint(6, 9),
            rng.choice([4, 5, 6]))
    return Scene(16, (o,))


def _scene_shapes(rng: random.Random) -> list[str]:
    """1–3 distinct shapes; each further shape is, with probability 0.5, the absent partner of
    one already chosen (co-occurrence), else uniform among the absent shapes."""
    shapes = [rng.choice(SHAPES)]
    for _ in range(rng.randint(1, 3) - 1):
        partners = [PARTNER[s] for s in shapes if s in PARTNER and PARTNER[s] not in shapes]
        if partners and rng.random() < 0.5:
            shapes.append(rng.choice(partners))
        else:
            shapes.append(rng.choice([s for s in SHAPES if s not in shapes]))
    return shapes


def _sample_scene(rng: random.Random) -> Scene:
    """32×32: shapes in distinct cells of a 2×2 grid (reading order), centre cell±2, r in 4..6."""
    shapes = _scene_shapes(rng)
    cells = sorted(rng.sample(range(4), len(shapes)))
    objects = []
    for shape, cell in zip(shapes, cells):
        row, col = divmod(cell, 2)
        objects.append(Obj(rng.choice(list(COLOURS)), shape, 8 + 16 * col + rng.randint(-2, 2),
                           8 + 16 * row + rng.randint(-2, 2), rng.randint(4, 6)))
    return Scene(32, tuple(objects))


def _force_heldout(scene: Scene, rng: random.Random) -> Scene:
    """Recolour/reshape one object so the scene holds a held-out combination (split "combos")."""
    allowed = sorted(HELDOUT_COMBOS if scene.size == 32 else {c for c in HELDOUT_COMBOS if c[1] in IMAGE_SHAPES})
    others = {o.shape for o in scene.objects}
    i = rng.randrange(len(scene.objects))
    choices = [c for c in allowed if c[1] == scene.objects[i].shape or c[1] not in others] or allowed
    colour, shape = rng.choice(choices)
    if shape in others and shape != scene.objects[i].shape:  # keep shapes distinct
        shape = scene.objects[i].shape
        colour = rng.choice([c for c, s in allowed if s == shape] or [colour])
    o = scene.objects[i]
    objects = list(scene.objects)
    objects[i] = Obj(colour, shape, o.cx, o.cy, o.r)
    return Scene(scene.size, tuple(objects))


def sample_scenes(n: int, seed: int, split: str = "train", kind: str = "scenes") -> list[Scene]:
    """`n` scenes of `split` ("train", "test", "combos"), deterministic in (kind, split, seed).

    Rejection sampling on `split_of`, so train and test never share an image."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    rng = random.Random(f"toyworld:{kind}:{split}:{seed}")
    sample = _sample_object if kind == "objects" else _sample_scene
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = sample(rng)
        if split == "combos" and split_of(scene) != "combos":
            scene = _force_heldout(scene, rng)
        if split_of(scene) == split:
            scenes.append(scene)
    return scenes


def web_caption(scene: Scene, rng: random.Random, partner_prob: float = 0.6) -> str:
    """A biased "web" caption: the true caption, then, for each object whose co-occurring
    partner is absent, with probability `partner_prob` the partner is named too (random
    colour), as web captions name objects that usually come together (METHODS.md §9)."""
    words = [o.caption() for o in scene.objects]
    present = scene.shapes()
    for o in scene.objects:
        partner = PARTNER.get(o.shape)
        if partner and partner not in present and rng.random() < partner_prob:
            words.append(f"a {rng.choice(list(COLOURS))} {partner}")
            present.add(partner)
    return " and ".join(words)


def yes_no_questions(present: list[set[str]], rng: random.Random) -> list[tuple[int, str, str]]:
    """POPE-style questions answered from the TRUE objects: per image, one present shape
    ("yes") and one absent shape ("no": its co-occurring partner when that is absent, with
    probability 0.5, else any absent shape). Returns (image index, shape, answer) triples."""
    out = []
    for i, shapes in enumerate(present):
        shown = sorted(shapes)
        absent = [s for s in SHAPES if s not in shown]
        partners = [PARTNER[s] for s in shown if s in PARTNER and PARTNER[s] not in shown]
        no = rng.choice(partners) if partners and rng.random() < 0.5 else rng.choice(absent)
        for shape, answer in ((rng.choice(shown), "yes"), (no, "no")):
            out.append((i, shape, answer))
    return out


# -- COCO-format files --------------------------------------------------------------------
def categories() -> list[dict[str, Any]]:
    """COCO categories: one per shape, ids 1..7."""
    return [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]


def coco_annotations(scenes: list[Scene], file_names: list[str]) -> tuple[dict, dict]:
    """(instances, captions) COCO dicts: bbox [x, y, w, h] of the drawn pixels, area = pixel
    count, iscrowd 0, plus the object's `colour`; one reference caption per image."""
    import numpy as np

    cat_id = {c["name"]: c["id"] for c in categories()}
    images, instances, captions = [], [], []
    for image_id, (scene, name) in enumerate(zip(scenes, file_names), start=1):
        images.append({"id": image_id, "file_name": name, "width": scene.size, "height": scene.size})
        captions.append({"id": image_id, "image_id": image_id, "caption": scene.caption()})
        for o in scene.objects:
            ys, xs = np.nonzero(object_mask(o, scene.size))
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": cat_id[o.shape],
                              "bbox": bbox, "area": int(len(xs)), "iscrowd": 0, "segmentation": [],
                              "colour": o.colour})
    info = {"description": "mmalign toy world (procedural shapes)", "version": "1.0"}
    return ({"info": info, "licenses": [], "images": images, "annotations": instances, "categories": categories()},
            {"info": info, "licenses": [], "images": images, "annotations": captions})


def write_world(out_dir: str | Path, n: int, seed: int, split: str = "train", kind: str = "scenes") -> dict[str, Path]:
    """Render `n` scenes of `split` into `out_dir`:

    - ``images/{split}_{i:06d}.png``;
    - ``{split}.jsonl``: {"image", "caption", "prompt", "objects": [{"colour", "shape", "cx",
      "cy", "r"}]} per image (paths relative to the jsonl; "prompt" is the captioner's
      instruction for scenes, the caption itself for objects);
    - ``instances_{split}.json`` and ``captions_{split}.json`` (COCO format; `file_name` is
      relative to ``images/``, as COCO's are to their image folder).

    Returns {"jsonl", "instances", "captions", "images"} paths."""
    from mmalign.io import atomic_path

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(n, seed, split, kind)
    names = [f"images/{split}_{i:06d}.png" for i in range(len(scenes))]
    rows = []
    for scene, name in zip(scenes, names):
        render(scene).save(out / name)
        rows.append({"image": name, "caption": scene.caption(),
                     "prompt": PROMPT if kind == "scenes" else scene.caption(),
                     "objects": [vars(o) for o in scene.objects]})
    # COCO convention: file_name is the name inside the image folder (`paths["images"]`).
    instances, captions = coco_annotations(scenes, [Path(name).name for name in names])
    paths = {"jsonl": out / f"{split}.jsonl", "instances": out / f"instances_{split}.json",
             "captions": out / f"captions_{split}.json", "images": out / "images"}
    for key, text in (("jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
                      ("instances", json.dumps(instances)), ("captions", json.dumps(captions))):
        with atomic_path(paths[key]) as tmp:
            Path(tmp).write_text(text)
    return paths
