"""A tiny Qwen-Image-Edit pipeline folder built from the real config classes in code (no downloads),
saved with `save_pretrained` so tests load it through `build(cfg)`: the tiny Qwen-Image parts
(tests/qwen_image_fixtures.py: transformer, Qwen VAE, Qwen-Image's scheduler) plus

- a word-level tokenizer holding the edit template's words and Qwen2.5-VL's vision specials
  (<|vision_start|>, <|image_pad|>, <|vision_end|>);
- Qwen2_5_VLForConditionalGeneration whose 1-block vision tower (patch 14, merge 2) really reads the
  source image: the processor (`Qwen2VLProcessor`, min/max pixels 28² .. 56²) expands <|image_pad|>
  to 1..4 merged patch tokens;
- `processor/` as QwenImageEditPipeline loads it.

`write_tiny_qwen_image_edit_run(root)` also writes edit pairs {source_image, prompt, chosen,
rejected} of 32×32 PNGs (the shipped sample under datasets/edit_pairs has the same layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusion_fixtures import write_image
from flow_fixtures import WORDS
from qwen_image_fixtures import SCHEDULER, WIDTH, tiny_qwen_transformer, tiny_qwen_vae

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<|vision_start|>", "<|image_pad|>",
            "<|vision_end|>", "<|video_pad|>"]
TEMPLATE_WORDS = ("system \n Describe the key features of input image ( color , shape size texture objects "
                  "background ) then explain how user ' s text instruction should alter or modify . Generate a "
                  "new that meets requirements while maintaining consistency with original where appropriate "
                  "assistant Picture 1 2 : make it remove add").split(" ")
EDITS = ["make it red", "make the square blue", "add a star", "remove the circle"]


def tiny_edit_tokenizer():
    """Word-level fast tokenizer: specials, the edit template's words (newline a token), then WORDS."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys([*SPECIALS, *TEMPLATE_WORDS, "\n", *WORDS]))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" +"), behavior="removed"),
                                                 pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", model_max_length=32768)


def tiny_edit_processor():
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    return Qwen2VLProcessor(image_processor=images, tokenizer=tiny_edit_tokenizer(),
                            video_processor=Qwen2VLVideoProcessor())


def tiny_edit_vl():
    """Qwen2.5-VL (text hidden 32, 2 layers; vision 1 block of 16) with the tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny_edit_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, pad_token_id=0,
                bos_token_id=0, eos_token_id=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=WIDTH,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))


def save_tiny_qwen_image_edit_pipeline(path: Path, seed: int = 0, pipeline: str = "QwenImageEditPipeline") -> Path:
    """Write transformer/, vae/, scheduler/, text_encoder/, tokenizer/, processor/ and the
    model_index.json of `pipeline` (QwenImageEditPipeline, or QwenImageEditPlusPipeline) into `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmalign.export import write_model_index

    torch.manual_seed(seed)
    tiny_qwen_transformer().save_pretrained(path / "transformer")
    tiny_qwen_vae().save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    tiny_edit_vl().save_pretrained(path / "text_encoder")
    processor = tiny_edit_processor()
    processor.tokenizer.save_pretrained(path / "tokenizer")
    processor.save_pretrained(path / "processor")
    write_model_index(path, pipeline)
    return path


def write_edit_pairs(root: Path, count: int, size: tuple[int, int] = (32, 32)) -> Path:
    """`count` edit records {source_image, prompt, chosen, rejected} with PNGs in `root/images` (paths
    relative to `root`) and their jsonl `root/train.jsonl`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        names = [write_image(root / "images" / f"{i}_{k}.png", *size, seed=3 * i + j)
                 for j, k in enumerate(("source", "chosen", "rejected"))]
        source, chosen, rejected = (str(p.relative_to(root)) for p in names)
        records.append({"source_image": source, "prompt": EDITS[i % len(EDITS)], "chosen": chosen,
                        "rejected": rejected})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_tiny_qwen_image_edit_run(root: Path, count: int = 8, pipeline: str = "QwenImageEditPipeline") -> Path:
    """A tiny edit pipeline in `root/pipeline` and `count` edit pairs in `root/pairs/train.jsonl`."""
    save_tiny_qwen_image_edit_pipeline(root / "pipeline", pipeline=pipeline)
    return write_edit_pairs(root / "pairs", count)


if __name__ == "__main__":  # python tests/qwen_image_edit_fixtures.py runs/tiny_qwen_image_edit
    import sys

    write_tiny_qwen_image_edit_run(Path(sys.argv[1]), count=32)
    print(f"wrote {sys.argv[1]}/pipeline and {sys.argv[1]}/pairs/train.jsonl")
