"""A tiny FLUX.2 [klein] pipeline folder built from the real config classes in code (no downloads),
saved with `save_pretrained` so tests load it through `build(cfg)`:

- Flux2Transformer2DModel (patch 1, 16 input channels = 4 VAE channels patchified 2×2, one double-
  and one single-stream block, 2 heads of 16 = RoPE axes 4 + 4 + 4 + 4, text width 3·16 = the three
  stacked Qwen3 layers), no guidance embedding (klein);
- Qwen3ForCausalLM (hidden 16, 27 layers: the pipeline stacks hidden_states 9, 18 and 27) as the
  text encoder, with the word-level Qwen-style tokenizer and chat template of zimage_fixtures;
- AutoencoderKLFlux2 (2 blocks, 4 latent channels, its batch norm over the 16 patchified channels
  given non-trivial running statistics): 16×16 images -> 4×8×8 latents -> 16×4×4 patchified;
- FlowMatchEulerDiscreteScheduler with FLUX's dynamic shift (klein's scheduler config).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusion_fixtures import write_image_pairs
from flow_fixtures import FLUX_SCHEDULER
from zimage_fixtures import tiny_qwen_tokenizer

QWEN_WIDTH = 16


def tiny_qwen3_lm():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=QWEN_WIDTH, intermediate_size=32,
                                        num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=8, max_position_embeddings=1024, pad_token_id=0))


def tiny_flux2_vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                             layers_per_block=1, norm_num_groups=8, sample_size=16)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
        vae.bn.running_var.copy_(torch.linspace(0.25, 4.0, 16))
    return vae


def tiny_flux2_transformer():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * QWEN_WIDTH,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)


def save_tiny_flux2_pipeline(path: Path, seed: int = 0) -> Path:
    """Write transformer/, vae/, scheduler/, text_encoder/ and tokenizer/ into `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tiny_flux2_transformer().save_pretrained(path / "transformer")
    tiny_flux2_vae().save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **FLUX_SCHEDULER).save_pretrained(path / "scheduler")
    tiny_qwen3_lm().save_pretrained(path / "text_encoder")
    tiny_qwen_tokenizer().save_pretrained(path / "tokenizer")
    return path


def write_tiny_flux2_run(root: Path, count: int = 8) -> Path:
    """A tiny pipeline in `root/pipeline` and `count` image pairs in `root/pairs/train.jsonl`."""
    save_tiny_flux2_pipeline(root / "pipeline")
    records = write_image_pairs(root / "pairs", count)
    path = root / "pairs" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


if __name__ == "__main__":  # python tests/flux2_fixtures.py runs/tiny_flux2
    import sys

    write_tiny_flux2_run(Path(sys.argv[1]), count=32)
    print(f"wrote {sys.argv[1]}/pipeline and {sys.argv[1]}/pairs/train.jsonl")
