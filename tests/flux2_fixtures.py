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

FLUX.2 [dev] (`save_tiny_flux2_dev_pipeline`): the same VAE and scheduler; the transformer with the
guidance embedding; Mistral3ForConditionalGeneration (text: hidden 16, 30 layers: the pipeline
stacks hidden_states 10, 20 and 30; a 1-block Pixtral vision tower, unused by text prompts) with a
PixtralProcessor of a word-level tokenizer carrying Mistral's specials and a chat template shaped
like Mistral-Small-3.1's ([SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST], content blocks).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusion_fixtures import write_image_pairs
from flow_fixtures import FLUX_SCHEDULER, WORDS
from recording import RecordingTransformer
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


def tiny_flux2_transformer(guidance_embeds: bool = False):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * QWEN_WIDTH,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds)


MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- if messages[0]['content'] is string %}"
    "{%- set system_message = messages[0]['content'] %}{%- else %}"
    "{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if message['content'] is string %}"
    "{{- '[INST]' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}{%- elif block['type'] in ['image', 'image_url'] %}"
    "{{- '[IMG]' }}{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}")


def tiny_pixtral_processor():
    """PixtralProcessor of a word-level tokenizer: Mistral's specials first, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*MISTRAL_SPECIALS, *WORDS])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(MISTRAL_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=1024)
    return PixtralProcessor(image_processor=PixtralImageProcessor(patch_size=6), tokenizer=fast, patch_size=6,
                            chat_template=MISTRAL_TEMPLATE)


def tiny_mistral3(hidden: int = QWEN_WIDTH, layers: int = 30, heads: int = 2, head_dim: int = 8,
                  intermediate: int = 32, vocab: int = 64):
    """Mistral3ForConditionalGeneration: a Mistral text model (`hidden` wide, `layers` deep) and a
    1-block Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim,
                max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None,
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, image_size=24, patch_size=6, num_channels=3)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                           image_token_index=8, spatial_merge_size=1))


def save_tiny_flux2_dev_pipeline(path: Path, seed: int = 0) -> Path:
    """FLUX.2 [dev]: transformer/ (guidance embedding, text width 3·16), vae/, scheduler/,
    text_encoder/ (Mistral3) and tokenizer/ (PixtralProcessor) in `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tiny_flux2_transformer(guidance_embeds=True).save_pretrained(path / "transformer")
    tiny_flux2_vae().save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **FLUX_SCHEDULER).save_pretrained(path / "scheduler")
    tiny_mistral3().save_pretrained(path / "text_encoder")
    tiny_pixtral_processor().save_pretrained(path / "tokenizer")
    return path


class RecordingFlux2(RecordingTransformer):
    """Stands for Flux2Transformer2DModel in a pipeline (tests/recording.py)."""

    def __init__(self, guidance_embeds: bool = False) -> None:
        super().__init__(SimpleNamespace(in_channels=16, guidance_embeds=guidance_embeds))

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


def write_tiny_flux2_run(root: Path, count: int = 8, dev: bool = False) -> Path:
    """A tiny pipeline (klein, or dev) in `root/pipeline` and `count` image pairs in `root/pairs/train.jsonl`."""
    (save_tiny_flux2_dev_pipeline if dev else save_tiny_flux2_pipeline)(root / "pipeline")
    records = write_image_pairs(root / "pairs", count)
    path = root / "pairs" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


if __name__ == "__main__":  # python tests/flux2_fixtures.py runs/tiny_flux2 [--dev]
    import sys

    write_tiny_flux2_run(Path(sys.argv[1]), count=32, dev="--dev" in sys.argv[2:])
    print(f"wrote {sys.argv[1]}/pipeline and {sys.argv[1]}/pairs/train.jsonl")
