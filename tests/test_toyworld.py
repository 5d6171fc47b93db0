"""The toy world (mmalign/toyworld): determinism, COCO files, held-out splits, the exact
checkers on hand-drawn images, and the three shipped checkpoints (load + one forward)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign.config import resolve_path
from mmalign.toyworld import checker, world
from mmalign.toyworld.models import CAPTIONER_PATH, DIFFUSION_PATH, SCORER_PATH, shipped_size

GREY, RED, BLUE = world.BACKGROUND, world.COLOURS["red"], world.COLOURS["blue"]


def canvas(size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(GREY, dtype=np.uint8), (size, size, 3)).copy()


# -- world --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["objects", "scenes"])
def test_sampling_is_deterministic_from_the_seed(kind):
    a = world.sample_scenes(50, 3, "train", kind)
    assert a == world.sample_scenes(50, 3, "train", kind)
    assert a != world.sample_scenes(50, 4, "train", kind)
    assert a[:20] == world.sample_scenes(20, 3, "train", kind)  # a prefix does not depend on n


def test_write_world_is_byte_identical_for_the_same_seed(tmp_path):
    first = world.write_world(tmp_path / "a", 6, seed=1, split="test")
    second = world.write_world(tmp_path / "b", 6, seed=1, split="test")
    for key in ("jsonl", "instances", "captions"):
        assert first[key].read_bytes() == second[key].read_bytes()
    for png in sorted(first["images"].iterdir()):
        assert png.read_bytes() == (second["images"] / png.name).read_bytes()


def test_coco_instances_match_the_drawn_pixels(tmp_path):
    from PIL import Image

    paths = world.write_world(tmp_path, 20, seed=0, split="train", kind="objects")
    inst = json.loads(paths["instances"].read_text())
    caps = json.loads(paths["captions"].read_text())
    assert [c["name"] for c in inst["categories"]] == world.SHAPES
    assert [c["id"] for c in inst["categories"]] == list(range(1, 8))
    ids = {im["id"]: im for im in inst["images"]}
    assert len(ids) == 20 and len(inst["annotations"]) == 20  # one object per 16x16 image
    rows = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    for ann, cap, row in zip(inst["annotations"], caps["annotations"], rows):
        image = ids[ann["image_id"]]
        pixels = np.asarray(Image.open(tmp_path / "images" / image["file_name"]))
        mask = (pixels != GREY).any(-1)
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum()
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert world.SHAPES[ann["category_id"] - 1] == row["objects"][0]["shape"]
        assert cap["image_id"] == ann["image_id"] and cap["caption"] == row["caption"] == row["prompt"]
        assert cap["caption"] == f"a {ann['colour']} {world.SHAPES[ann['category_id'] - 1]}"


def test_scene_captions_and_annotations_list_every_object(tmp_path):
    paths = world.write_world(tmp_path, 30, seed=2, split="train")
    inst = json.loads(paths["instances"].read_text())
    rows = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    assert sum(len(r["objects"]) for r in rows) == len(inst["annotations"])
    for image_id, row in enumerate(rows, start=1):
        shapes = [world.SHAPES[a["category_id"] - 1] for a in inst["annotations"] if a["image_id"] == image_id]
        assert shapes == [o["shape"] for o in row["objects"]] == checker.caption_objects(row["caption"])
        assert 1 <= len(shapes) == len(set(shapes)) <= 3
        assert row["prompt"] == world.PROMPT


@pytest.mark.parametrize("kind", ["objects", "scenes"])
def test_held_out_splits_are_disjoint(kind):
    keys = {split: {world.scene_key(s) for s in world.sample_scenes(300, seed, split, kind)}
            for split, seed in (("train", 0), ("test", 0), ("combos", 0))}
    assert not keys["train"] & keys["test"] and not keys["combos"] & (keys["train"] | keys["test"])
    for split in ("train", "test"):
        for scene in world.sample_scenes(100, 7, split, kind):
            assert not any((o.colour, o.shape) in world.HELDOUT_COMBOS for o in scene.objects)
    for scene in world.sample_scenes(100, 7, "combos", kind):
        assert any((o.colour, o.shape) in world.HELDOUT_COMBOS for o in scene.objects)
    assert not set(world.TRAIN_PROMPTS) & set(world.HELDOUT_PROMPTS)
    assert len(world.TRAIN_PROMPTS) + len(world.HELDOUT_PROMPTS) == 12


def test_web_captions_name_the_absent_partner():
    alone = world.Scene(32, (world.Obj("red", "square", 8, 8, 5),))
    with_partner = world.Scene(32, (world.Obj("red", "square", 8, 8, 5), world.Obj("blue", "circle", 24, 8, 5)))
    rng = __import__("random").Random(0)
    assert checker.caption_objects(world.web_caption(alone, rng, 1.0)) == ["square", "circle"]
    assert world.web_caption(alone, rng, 0.0) == "a red square"
    assert world.web_caption(with_partner, rng, 1.0) == "a red square and a blue circle"


# -- checkers -----------------------------------------------------------------------------
def test_clean_renders_score_exactly_one():
    for shape in world.IMAGE_SHAPES:
        for r in (4, 5, 6):
            scene = world.Scene(16, (world.Obj("green", shape, 8, 7, r),))
            assert checker.image_score(world.render(scene), scene.caption()) == 1.0
            assert (checker.palette_labels(world.render(scene)) >= 0).all()


def test_checker_on_hand_drawn_images():
    image = canvas()
    image[2:6, 3:7] = RED  # a 4x4 red square: 16 pixels, fill 1
    assert checker.image_score(image, "a red square") == 1.0
    # circle asked: fill 1.0 vs 0.78 -> 1 - (0.22 - 0.05) / 0.2 = 0.15
    assert checker.image_score(image, "a red circle") == pytest.approx(0.15)
    assert checker.image_score(image, "a red triangle") == 0.0  # |1 - 0.5| - 0.05 > 0.2
    assert checker.image_score(image, "a blue square") == 0.0  # nothing blue drawn
    image[10:12, 10:12] = BLUE  # 4 stray blue pixels: colour fraction 16 / 20
    assert checker.image_score(image, "a red square") == pytest.approx(0.8)
    image[14, 14] = (180, 80, 80)  # 69 from red: no palette colour, still drawn -> 16 / 21
    assert checker.image_parts(image, "a red square")["colour"] == pytest.approx(16 / 21)

    stairs = canvas()
    for row in range(4):  # a right triangle of 1+2+3+4 = 10 pixels in a 4x4 box: fill 0.625
        stairs[8 + row, 2:3 + row] = RED
    # triangle: 1 - (0.125 - 0.05) / 0.2 = 0.625; circle: |0.625 - 0.78| = 0.155 -> 0.475
    assert checker.image_score(stairs, "a red triangle") == pytest.approx(0.625)
    assert checker.image_score(stairs, "a red circle") == pytest.approx(0.475)
    small = canvas()
    small[0:2, 0:4] = RED  # 8 pixels < MIN_AREA
    assert checker.image_score(small, "a red square") == 0.0
    with pytest.raises(ValueError, match="exactly one colour"):
        checker.image_score(image, "a circle")


def test_caption_chair_counts_by_hand():
    captions = ["a red circle and a blue square", "a green ring", "two bars and a cross", ""]
    present = [{"circle"}, {"ring", "diamond"}, {"bar", "cross"}, {"circle"}]
    m = checker.chair(captions, present)
    # mentions: circle square | ring | bar cross -> 5, hallucinated: square -> 1
    assert m["chair_i"] == pytest.approx(1 / 5)
    assert m["chair_s"] == pytest.approx(1 / 4)
    assert m["recall"] == pytest.approx(4 / 6)  # circle, ring, bar, cross of 6 present


def test_vocabulary_file_lists_the_shapes():
    path = resolve_path("pkg://vocab/toyworld_objects.txt")
    lines = [ln.strip() for ln in open(path) if ln.strip() and not ln.startswith("#")]
    assert [ln.split(",")[0] for ln in lines] == world.SHAPES


# -- shipped checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize("name", [DIFFUSION_PATH, CAPTIONER_PATH, SCORER_PATH])
def test_shipped_checkpoints_are_small_fp16(name):
    from safetensors import safe_open

    path = resolve_path(name)
    assert 0 < shipped_size(path) < 3.2e6
    files = list(__import__("pathlib").Path(path).rglob("*.safetensors"))
    assert files
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_shipped_diffusion_pipeline_samples_and_trains(tmp_path):
    from diffusers import DiffusionPipeline

    from mmalign.config import Config, from_dict
    from mmalign.modalities import build_modality

    path = resolve_path(DIFFUSION_PATH)
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle"], num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.vae_scale_factor == 1

    rows = [json.loads(line) for line in world.write_world(tmp_path, 2, 0, "train", "objects")["jsonl"].open()]
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": rows[0]["caption"], "chosen": rows[0]["image"],
                                                      "rejected": rows[1]["image"]}) + "\n")
    cfg = from_dict(Config, {"modality": "sd", "model": {"path": DIFFUSION_PATH},
                             "data": {"train": str(tmp_path / "pairs.jsonl")},
                             "diffusion": {"resolution": 16, "caption_dropout": 0.0}})
    unet, likelihood, _ = build_modality(cfg)
    batch = likelihood.collate([json.loads((tmp_path / "pairs.jsonl").read_text())], "pair")
    draw = likelihood.draw(batch, torch.Generator().manual_seed(0))
    logps = likelihood.logps(unet, batch, draw).logps
    assert logps.shape == (2,) and torch.isfinite(logps).all()


def test_shipped_captioner_generates_a_caption():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_path(CAPTIONER_PATH)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    scene = world.sample_scenes(1, 0, "test")[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": world.PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[world.render(scene)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    caption = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert checker.caption_objects(caption)  # it names at least one shape


def test_shipped_scorer_prefers_the_right_caption():
    from transformers import CLIPModel, CLIPProcessor

    path = resolve_path(SCORER_PATH)
    model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(path)
    images = [world.render(world.Scene(16, (world.Obj(c, s, 8, 8, 5),))) for c, s in (("red", "circle"),
                                                                                      ("green", "triangle"))]
    inputs = processor(text=["a red circle", "a green triangle"], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (2, 2)
    assert logits.argmax(-1).tolist() == [0, 1]
