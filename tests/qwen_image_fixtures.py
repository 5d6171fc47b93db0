"""A tiny Qwen-Image pipeline folder built from the real config classes in code (no downloads),
saved with `save_pretrained` so tests load it through `build(cfg)`:

- QwenImageTransformer2DModel (patch 2, 1 block, 2 heads of 16 = RoPE axes 4 + 6 + 6), 4 latent
  channels (in_channels 16 packed), text width 32;
- Qwen2_5_VLForConditionalGeneration (text: hidden 32, 2 layers, mrope sections 2 + 3 + 3; vision:
  1 block, unused) as the text encoder, with a word-level tokenizer that has Qwen's specials and
  keeps "\\n" as a token, so the pipeline's system prefix is 34 tokens as with Qwen's own tokenizer;
- AutoencoderKLQwenImage (base_dim 8, z_dim 4, dim_mult [1, 2], one temporal-downsample entry:
  16×16 images -> 4×8×8 latents) with non-trivial latents_mean / latents_std;
- FlowMatchEulerDiscreteScheduler with Qwen-Image's published scheduler config (dynamic shift,
  base 0.5 at 256, max 0.9 at 8192, exponential, shift_terminal 0.02).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusion_fixtures import write_image_pairs
from flow_fixtures import WORDS
from recording import RecordingTransformer

WIDTH = 32
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
TEMPLATE_WORDS = ["system", "user", "assistant", "\n", "Describe", "the", "image", "by", "detailing", "color", ",",
                  "shape", "size", "texture", "quantity", "text", "spatial", "relationships", "objects", "and",
                  "background", ":"]


def tiny_qwen_tokenizer():
    """Word-level fast tokenizer: specials, the template's words (newline a token), then WORDS."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *TEMPLATE_WORDS, *[w for w in WORDS if w not in TEMPLATE_WORDS]]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" +"), behavior="removed"),
                                                 pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", model_max_length=32768)


def tiny_qwen25_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=48, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=2048, pad_token_id=0, bos_token_id=0, eos_token_id=2,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=WIDTH,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def tiny_qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                  temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, -0.4],
                                  latents_std=[1.5, 0.5, 2.0, 1.25])


def tiny_qwen_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=WIDTH,
                                       axes_dims_rope=(4, 6, 6))


SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, time_shift_type="exponential", shift_terminal=0.02)


def save_tiny_qwen_image_pipeline(path: Path, seed: int = 0) -> Path:
    """Write transformer/, vae/, scheduler/, text_encoder/ and tokenizer/ into `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tiny_qwen_transformer().save_pretrained(path / "transformer")
    tiny_qwen_vae().save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    tiny_qwen25_vl().save_pretrained(path / "text_encoder")
    tiny_qwen_tokenizer().save_pretrained(path / "tokenizer")
    return path


def write_tiny_qwen_image_run(root: Path, count: int = 8) -> Path:
    """A tiny pipeline in `root/pipeline` and `count` image pairs in `root/pairs/train.jsonl`."""
    save_tiny_qwen_image_pipeline(root / "pipeline")
    records = write_image_pairs(root / "pairs", count)
    path = root / "pairs" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class RecordingQwen(RecordingTransformer):
    """Stands for QwenImageTransformer2DModel in a pipeline (tests/recording.py)."""

    config = SimpleNamespace(in_channels=16, guidance_embeds=False)


if __name__ == "__main__":  # python tests/qwen_image_fixtures.py runs/tiny_qwen_image
    import sys

    write_tiny_qwen_image_run(Path(sys.argv[1]), count=32)
    print(f"wrote {sys.argv[1]}/pipeline and {sys.argv[1]}/pairs/train.jsonl")
