"""A tiny LLaVA built from configs in code (no downloads), and a toy shapes world for it.

Shaped like LLaVA-1.5 (CLIP vision tower -> 2-layer MLP projector -> Llama), only tiny:

- vision: 2-layer `CLIPVisionModel`, hidden 32, patch 8 on 32x32 images -> 16 image tokens
  (`vision_feature_select_strategy="default"` drops the CLS; `vision_feature_layer=-1`,
  since -2 would be layer 1 of a 2-layer tower; METHODS.md §9);
- text: 2-layer Llama, hidden 64, word-level tokenizer whose vocabulary includes `<image>`;
- processor: `LlavaProcessor` (`num_additional_image_tokens=1` for the CLIP CLS) with a
  `CLIPImageProcessor` of size 32 and a LLaVA-1.5-style chat template
  ("USER : <image> describe the image . ASSISTANT :").

`next_style=True` builds the LLaVA-NeXT equivalent (`LlavaNextForConditionalGeneration`,
`LlavaNextProcessor`, anyres grid of 32/64 pixels), whose processor also returns
`image_sizes`. The toy world: 32x32 PNGs of one coloured shape, captioned "a red circle";
`make_shape_pairs` writes TRL-style VLM preference records whose rejected caption names a
wrong colour. Heavy imports happen inside functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 180, 60),
                                            "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES: list[str] = ["circle", "square", "triangle"]
IMAGE_TOKEN = "<image>"
VLM_WORDS: list[str] = [IMAGE_TOKEN, "USER", "ASSISTANT", ":", ".", "a", "and", "the", "image", "describe",
                        "what", "is", "in", "first", "second", *COLOURS, *SHAPES]
PROMPT = "describe the image ."
# LLaVA-1.5 layout: "USER: <image>\n{prompt} ASSISTANT:"; string or typed-list message content.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER : "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% else %}ASSISTANT : {{ m['content'] if m['content'] is string else m['content'][0]['text'] }} "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_vlm_tokenizer(words: list[str] | None = None) -> Any:
    """Word-level tokenizer (mmalign.toytext) whose vocabulary holds `<image>` as an added
    special token, so "<image><image>" and "<image> a" split into whole image tokens."""
    from mmalign.toytext import build_word_tokenizer

    tokenizer = build_word_tokenizer(VLM_WORDS if words is None else words)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)  # already in the vocab: keeps its id
    tokenizer.model_max_length = 256
    return tokenizer


def tiny_llava_config(tokenizer: Any, *, image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32,
                      text_hidden: int = 64, next_style: bool = False) -> Any:
    """A `LlavaConfig` (or `LlavaNextConfig`) with a 2-layer CLIP tower and a 2-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                              projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, attention_dropout=0.0, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    common = dict(vision_config=vision, text_config=text, vision_feature_layer=-1,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu",
                  image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=False)
    if next_style:
        return LlavaNextConfig(image_grid_pinpoints=grid_pinpoints(image_size), **common)
    return LlavaConfig(**common)


def grid_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT anyres resolutions: 1x1, 1x2, 2x1 and 2x2 tiles of `image_size`."""
    return [[image_size * a, image_size * b] for a, b in ((1, 1), (1, 2), (2, 1), (2, 2))]


def build_tiny_llava(tokenizer: Any, *, seed: int = 0, **config_kwargs: Any) -> Any:
    """A randomly initialised tiny `LlavaForConditionalGeneration` (or NeXT with
    `next_style=True`); deterministic in `seed`, global RNG untouched."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    config = tiny_llava_config(tokenizer, **config_kwargs)
    cls = LlavaNextForConditionalGeneration if config_kwargs.get("next_style") else LlavaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


def build_tiny_llava_processor(tokenizer: Any, *, image_size: int = 32, patch_size: int = 8,
                               next_style: bool = False, num_additional_image_tokens: int = 1) -> Any:
    """`LlavaProcessor` (or `LlavaNextProcessor`) over a CLIP-style image processor resizing to
    `image_size`; `num_additional_image_tokens=1` counts the CLIP CLS (METHODS.md §9)."""
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    sizes = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    kwargs = dict(tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
                  chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
                  num_additional_image_tokens=num_additional_image_tokens)
    if next_style:
        images = LlavaNextImageProcessor(image_grid_pinpoints=grid_pinpoints(image_size), **sizes)
        return LlavaNextProcessor(image_processor=images, **kwargs)
    return LlavaProcessor(image_processor=CLIPImageProcessor(**sizes), **kwargs)


def save_tiny_llava(path: str | Path, *, seed: int = 0, next_style: bool = False) -> Path:
    """Build and `save_pretrained` a tiny LLaVA (model + processor) into `path`."""
    path = Path(path)
    tokenizer = build_vlm_tokenizer()
    build_tiny_llava(tokenizer, seed=seed, next_style=next_style).save_pretrained(path)
    build_tiny_llava_processor(tokenizer, next_style=next_style).save_pretrained(path)
    return path


# -- the toy shapes world -----------------------------------------------------------------
def draw_shape(colour: str, shape: str, size: int = 32, rng: random.Random | None = None) -> Any:
    """A `size`x`size` RGB PIL image: one filled `shape` of `colour` on a grey background,
    with a small random offset and scale when `rng` is given."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    r = size * rng.uniform(0.25, 0.4)
    cx, cy = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def shape_png(colour: str, shape: str) -> bytes:
    """`draw_shape(colour, shape)` encoded as PNG bytes (the dataset samples embed images so)."""
    import io

    buffer = io.BytesIO()
    draw_shape(colour, shape).save(buffer, format="PNG")
    return buffer.getvalue()


def make_shape_pairs(n: int, seed: int, out_dir: str | Path, images_per_example: int = 1) -> Path:
    """Write `n` preference records to `out_dir/pairs.jsonl` (+ PNGs under `out_dir/images`):
    {"images": ["images/00003-0.png", ...], "prompt": "describe the image .",
     "chosen": "a red circle", "rejected": "a blue circle"}; with several images per example
    the captions join with "and" and the rejected one recolours one shape. Deterministic."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        objects = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(images_per_example)]
        paths = []
        for j, (colour, shape) in enumerate(objects):
            rel = f"images/{i:05d}-{j}.png"
            draw_shape(colour, shape, rng=rng).save(out_dir / rel)
            paths.append(rel)
        wrong = list(objects)
        k = rng.randrange(len(objects))
        wrong[k] = (rng.choice([c for c in COLOURS if c != objects[k][0]]), objects[k][1])
        caption = lambda objs: " and ".join(f"a {c} {s}" for c, s in objs)  # noqa: E731
        records.append({"images": paths, "prompt": PROMPT, "chosen": caption(objects), "rejected": caption(wrong)})
    path = out_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_video_pairs(n: int, seed: int, out_dir: str | Path, frames: int = 4) -> Path:
    """Write `n` video preference records to `out_dir/pairs.jsonl`, each video a folder of
    `frames` 32x32 PNGs (`videos/00003/0.png`, ...) of one coloured shape sliding right by
    3 px a frame: {"videos": ["videos/00003"], "prompt": "describe the video .",
    "chosen": "a red circle", "rejected": "a blue circle"} (rejected: another colour).
    Deterministic in `seed`."""
    from PIL import ImageChops

    rng = random.Random(seed)
    out_dir = Path(out_dir)
    records = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image = draw_shape(colour, shape, rng=rng)
        folder = out_dir / "videos" / f"{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(frames):
            ImageChops.offset(image, 3 * t - 4, 0).save(folder / f"{t}.png")
        wrong = rng.choice([c for c in COLOURS if c != colour])
        records.append({"videos": [f"videos/{i:05d}"], "prompt": "describe the video .",
                        "chosen": f"a {colour} {shape}", "rejected": f"a {wrong} {shape}"})
    path = out_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
