"""A tiny Z-Image pipeline folder built from the real config classes in code (no downloads),
saved with `save_pretrained` so tests load it through `build(cfg)`:

- ZImageTransformer2DModel (patch 2, dim 32, 2 heads of 16 = RoPE axes 4 + 6 + 6, one refiner
  layer each for the image and the caption, one main layer), 4 latent channels, caption width 32;
- Qwen3Model (hidden 32, 2 layers) as the text encoder, with a word-level tokenizer that has
  Qwen's chat specials (<|im_start|>, <|im_end|>, pad <|endoftext|>) and a chat template shaped
  like Qwen3's (user turn, generation prompt, the empty think block only when
  enable_thinking is false);
- the SD3-like tiny VAE of flow_fixtures (2 blocks, shift_factor): 16×16 images -> 4×8×8 latents;
- FlowMatchEulerDiscreteScheduler(shift 3.0, static): Z-Image-Turbo's scheduler config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusion_fixtures import write_image_pairs
from flow_fixtures import WORDS, tiny_flow_vae

QWEN_WIDTH = 32
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen_tokenizer():
    """Word-level fast tokenizer: Qwen's specials first, then "user", "assistant" and WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, "user", "assistant", "think", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=32, hidden_size=QWEN_WIDTH, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=1024, pad_token_id=0))


def tiny_zimage_transformer():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=QWEN_WIDTH,
                                    axes_dims=[4, 6, 6], axes_lens=[1024, 32, 32])


def save_tiny_zimage_pipeline(path: Path, seed: int = 0) -> Path:
    """Write transformer/, vae/, scheduler/, text_encoder/ and tokenizer/ into `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tiny_zimage_transformer().save_pretrained(path / "transformer")
    tiny_flow_vae().save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).save_pretrained(
        path / "scheduler")
    tiny_qwen3().save_pretrained(path / "text_encoder")
    tiny_qwen_tokenizer().save_pretrained(path / "tokenizer")
    return path


def write_tiny_zimage_run(root: Path, count: int = 8) -> Path:
    """A tiny pipeline in `root/pipeline` and `count` image pairs in `root/pairs/train.jsonl`."""
    save_tiny_zimage_pipeline(root / "pipeline")
    records = write_image_pairs(root / "pairs", count)
    path = root / "pairs" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


if __name__ == "__main__":  # python tests/zimage_fixtures.py runs/tiny_zimage
    import sys

    write_tiny_zimage_run(Path(sys.argv[1]), count=32)
    print(f"wrote {sys.argv[1]}/pipeline and {sys.argv[1]}/pairs/train.jsonl")
