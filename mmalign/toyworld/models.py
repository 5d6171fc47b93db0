"""Builders of the three small toy-world models, from config in code (no downloads).

The project trains them (pipelines/train_toy_{diffusion,captioner,scorer}.py) and ships the
results in `mmalign/data/toyworld/` (fp16 safetensors, `pkg://toyworld/<name>`):

- ``diffusion``: a standard `StableDiffusionPipeline` folder for 16×16 images: a tiny
  `AutoencoderKL` with ONE block (no down-sampling: 3×16×16 pixels <-> 4×16×16 latents,
  trained to reconstruct the world, so the model works in pixel space in effect), a
  `UNet2DConditionModel` (channels 32/64, cross-attention at 8×8, METHODS.md §8), a 2-layer
  width-32 `CLIPTextModel` with a character-level `CLIPTokenizer`, a DDIM scheduler.
  `mmalign train` (modality ``sd``) and `DiffusionPipeline.from_pretrained` load it as is.
- ``captioner``: `LlavaForConditionalGeneration` (2-layer CLIP tower, hidden 64, patch 8 on
  32×32 -> 16 image tokens; 2-layer Llama, hidden 128; METHODS.md §9) + `LlavaProcessor`
  with a word-level tokenizer over the world's words (`mmalign.toyvlm` builders).
- ``scorer``: a transformers `CLIPModel` for 16×16 images (patch 4) + `CLIPProcessor` with
  the same character-level tokenizer, trained on the world to agree with the checker;
  PickScore-style scoring (`exp(logit_scale) · cos`) works on it unchanged.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from mmalign.toyworld.world import COLOURS, SHAPES

IMAGE_SIZE = 16  # image side (diffusion, scorer)
SCENE_SIZE = 32  # captioner side
MAX_TOKENS = 24  # "a yellow triangle" = 15 characters + start + end
DIFFUSION_PATH = "pkg://toyworld/diffusion"
FLOW_PATH = "pkg://toyworld/flow"  # SD3-shaped flow model (pipelines/train_toy_flow.py)
CAPTIONER_PATH = "pkg://toyworld/captioner"
SCORER_PATH = "pkg://toyworld/scorer"
CAPTION_WORDS: list[str] = ["<image>", "USER", "ASSISTANT", ":", ".", "a", "and", "the", "image", "describe",
                            "is", "there", "in", "yes", "no", "?", *COLOURS, *SHAPES]


# -- shared text side ---------------------------------------------------------------------
def char_tokenizer(max_length: int = MAX_TOKENS) -> Any:
    """A character-level `CLIPTokenizer` (BPE vocabulary of single characters, no merges),
    padded to `max_length` tokens; ids 0/1 are start/end (end doubles as padding)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def text_config(hidden: int = 32, layers: int = 2, projection: int = 32, max_length: int = MAX_TOKENS) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=max_length, projection_dim=projection,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


# -- diffusion ----------------------------------------------------------------------------
def diffusion_vae() -> Any:
    """One-block AutoencoderKL: 3×16×16 <-> 4×16×16 (scale factor 1), no mid attention."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=1.0,
                         mid_block_add_attention=False)


def diffusion_unet(channels: tuple[int, int] = (32, 64), cross_attention_dim: int = 32) -> Any:
    """UNet2DConditionModel on 4×16×16 latents, cross-attention at 8×8 (~1 M parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def diffusion_schedulers() -> tuple[Any, Any]:
    """(training DDPMScheduler, sampling DDIMScheduler) with SD's scaled-linear betas."""
    from diffusers import DDIMScheduler, DDPMScheduler

    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False)
    return DDPMScheduler(**betas), DDIMScheduler(**betas, set_alpha_to_one=False, steps_offset=1)


def build_diffusion(seed: int = 0) -> dict[str, Any]:
    """Randomly initialised {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} (the
    sampling scheduler), deterministic in `seed`, global RNG untouched."""
    import torch
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = {"unet": diffusion_unet(), "vae": diffusion_vae(), "text_encoder": CLIPTextModel(text_config())}
    return {**parts, "tokenizer": char_tokenizer(), "scheduler": diffusion_schedulers()[1]}


def diffusion_pipeline(parts: dict[str, Any]) -> Any:
    """A `StableDiffusionPipeline` of `parts` (no safety checker, no feature extractor)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# -- captioner ----------------------------------------------------------------------------
def captioner_tokenizer() -> Any:
    """Word-level tokenizer over `CAPTION_WORDS` with `<image>` as a special token. Text is
    lower-cased first (the chat template's USER / ASSISTANT excepted), so POPE's own question
    "Is there a circle in the image?" reads as known words."""
    from tokenizers import AddedToken, normalizers

    from mmalign.toyvlm import build_vlm_tokenizer

    tokenizer = build_vlm_tokenizer(CAPTION_WORDS)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    # already in the vocabulary (ids kept); not lower-cased, so the chat template still matches
    tokenizer.add_tokens([AddedToken(w, normalized=False, single_word=True) for w in ("USER", "ASSISTANT")])
    return tokenizer


def build_captioner(seed: int = 0) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, LlavaProcessor): CLIP tower hidden 64, patch 8 on 32×32
    (16 image tokens), Llama hidden 128, both 2 layers (~0.45 M parameters)."""
    from mmalign.toyvlm import build_tiny_llava, build_tiny_llava_processor

    tokenizer = captioner_tokenizer()
    model = build_tiny_llava(tokenizer, seed=seed, image_size=SCENE_SIZE, patch_size=8, vision_hidden=64,
                             text_hidden=128)
    processor = build_tiny_llava_processor(tokenizer, image_size=SCENE_SIZE, patch_size=8)
    return model, processor


# -- scorer -------------------------------------------------------------------------------
def build_scorer(seed: int = 0, hidden: int = 64, projection: int = 32) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) for 16×16 images: vision patch 4 (16 patches), both towers
    2 layers; the processor resizes/crops to 16 and uses the character-level tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=4, projection_dim=projection)
    config = CLIPConfig(text_config=text_config(hidden, projection=projection).to_dict(),
                        vision_config=vision.to_dict(), projection_dim=projection)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                 "width": IMAGE_SIZE})
    return model.eval(), CLIPProcessor(image_processor=images, tokenizer=char_tokenizer())


def shipped_size(path: str | Path) -> int:
    """Bytes of all files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_shipped(model: Any, processor: Any, out: Path) -> None:
    """`model` in float16 and its processor written to `out` through a temporary sibling folder
    that replaces `out` only once complete (the shipped checkpoints are saved so)."""
    import shutil

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.half().save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
