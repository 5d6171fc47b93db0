"""The folders of benchmarks/real_shapes.py: per family, the published transformer config of
configs/<family>/ at reduced depth and a text encoder of the published hidden width (the
reductions are listed in real_shapes.py's docstring), random weights in bfloat16, written with
`save_pretrained` beside the test fixtures' word-level tokenizers, tiny VAEs with the published
latent channels, and the published scheduler configs."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test fixtures' tokenizers, schedulers and pair writers

VIDEO_PAIRS = ROOT / "datasets" / "video_pairs" / "train.jsonl"
TEXT_KEYS = ("prompt_embeds", "encoder_hidden_states")  # the conditioning tensors the families draw


@dataclass(frozen=True)
class Shape:
    """One real-shape run: the family (`modality`), its shipped recipe, the published transformer
    config (configs/...json), what reduced depth replaces, the folder's other parts (`write`:
    text encoder, tokenizer, VAE, scheduler into a folder), pixels per latent token side (`unit`)."""

    modality: str
    recipe: str
    transformer: str
    depth: dict[str, int]
    write: Callable[[Path], None]
    unit: int
    video: bool = False


def published(name: str) -> dict[str, Any]:
    """configs/<name> without its `_source` / `_class_name` (kwargs of the config class)."""
    return {k: v for k, v in json.loads((ROOT / "configs" / name).read_text()).items() if not k.startswith("_")}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype` (a 2B-parameter transformer never exists in float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# -- text encoders of the published hidden width ----------------------------------------------------
def qwen3(config: str, layers: int, full_width_layers: bool, causal_lm: bool) -> Any:
    """Qwen3 of configs/<config>'s hidden size: `layers` deep; the published heads and MLP when
    `full_width_layers`, else 2 heads of head_dim, 1 KV head, MLP 256 (27 layers at 2560)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    c = published(config)
    heads = dict(num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                 intermediate_size=c["intermediate_size"]) if full_width_layers else dict(
        num_attention_heads=2, num_key_value_heads=1, intermediate_size=256)
    config = Qwen3Config(vocab_size=64, hidden_size=c["hidden_size"], num_hidden_layers=layers, head_dim=c["head_dim"],
                         rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=2048, pad_token_id=0, **heads)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def mistral3_dev() -> Any:
    """Mistral3 of FLUX.2 [dev]'s text hidden size 5120, 30 layers (the pipeline reads 10/20/30)."""
    from flux2_fixtures import tiny_mistral3

    text = published("flux2/text_encoder_dev.json")["text_config"]
    return tiny_mistral3(hidden=text["hidden_size"], layers=30, heads=2, head_dim=text["head_dim"], intermediate=256)


def qwen25_vl() -> Any:
    """Qwen2.5-VL with the published text model at 1 layer and a 1-block vision tower (out 3584)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t = published("qwen_image/text_encoder.json")["text_config"]
    text = dict(vocab_size=64, hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_hidden_layers=1, num_attention_heads=t["num_attention_heads"],
                num_key_value_heads=t["num_key_value_heads"], max_position_embeddings=2048,
                rms_norm_eps=t["rms_norm_eps"], pad_token_id=0, bos_token_id=0, eos_token_id=2, rope_scaling=t["rope_scaling"])
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=t["hidden_size"],
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def umt5() -> Any:
    """UMT5 of the published d_model / heads / d_kv / d_ff at 1 layer."""
    from transformers import UMT5Config, UMT5EncoderModel

    c = published("wan/text_encoder.json")
    return UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"],
                                       num_layers=1, num_heads=c["num_heads"], feed_forward_proj=c["feed_forward_proj"],
                                       relative_attention_num_buckets=c["relative_attention_num_buckets"],
                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


# -- tiny VAEs with the published latent channels -----------------------------------------------------
def flux2_vae() -> Any:
    """AutoencoderKLFlux2, 2 blocks (8 px -> 4 tokens after the 2x2 patchify), 32 latent channels."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=32,
                             layers_per_block=1, norm_num_groups=8, sample_size=16)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 128))
        vae.bn.running_var.copy_(torch.linspace(0.25, 4.0, 128))
    return vae


def flux1_vae() -> Any:
    """Z-Image's (FLUX.1's) AutoencoderKL config (16 channels, scaling / shift) at 2 blocks."""
    from diffusers import AutoencoderKL

    c = published("zimage/vae.json")
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=c["latent_channels"], norm_num_groups=8, sample_size=16,
                         scaling_factor=c["scaling_factor"], shift_factor=c["shift_factor"])


def qwen_vae() -> Any:
    """AutoencoderKLQwenImage, z_dim 16 with its published latents_mean / latents_std (the class
    defaults), one spatial downsample."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                  temperal_downsample=[False])


def wan_vae(ti2v: bool) -> Any:
    """AutoencoderKLWan, temporal factor 4: Wan 2.1's z_dim 16 (the class-default published
    latents_mean / std), spatial 4; or Wan 2.2 TI2V's z_dim 48, residual blocks, patch 2 on 12
    pixel channels (spatial 8), with seeded stand-in statistics."""
    from diffusers import AutoencoderKLWan

    common = dict(base_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1, attn_scales=[], temperal_downsample=[True, True],
                  scale_factor_temporal=4)
    if not ti2v:
        return AutoencoderKLWan(z_dim=16, scale_factor_spatial=4, **common)
    c = published("wan/vae_ti2v_5b.json")
    stats = torch.Generator().manual_seed(1)
    return AutoencoderKLWan(z_dim=c["z_dim"], is_residual=True, in_channels=c["in_channels"],
                            out_channels=c["out_channels"], patch_size=c["patch_size"], scale_factor_spatial=8,
                            latents_mean=(0.2 * torch.randn(48, generator=stats)).tolist(),
                            latents_std=(1 + torch.rand(48, generator=stats)).tolist(), **common)


# -- the folders --------------------------------------------------------------------------------------
def flow_scheduler(path: Path, **config: Any) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config).save_pretrained(path / "scheduler")


def write_flux2(path: Path, dev: bool) -> None:
    from flow_fixtures import FLUX_SCHEDULER
    from flux2_fixtures import tiny_pixtral_processor
    from zimage_fixtures import tiny_qwen_tokenizer

    with default_dtype(torch.bfloat16):
        encoder = mistral3_dev() if dev else qwen3("flux2/text_encoder_klein_4b.json", 27, False, True)
        encoder.save_pretrained(path / "text_encoder")
    (tiny_pixtral_processor() if dev else tiny_qwen_tokenizer()).save_pretrained(path / "tokenizer")
    flux2_vae().save_pretrained(path / "vae")
    flow_scheduler(path, **FLUX_SCHEDULER)


def write_qwen_image(path: Path) -> None:
    from qwen_image_fixtures import SCHEDULER, tiny_qwen_tokenizer

    with default_dtype(torch.bfloat16):
        qwen25_vl().save_pretrained(path / "text_encoder")
    tiny_qwen_tokenizer().save_pretrained(path / "tokenizer")
    qwen_vae().save_pretrained(path / "vae")
    flow_scheduler(path, **{k: v for k, v in SCHEDULER.items() if k != "num_train_timesteps"})


def write_zimage(path: Path) -> None:
    from zimage_fixtures import tiny_qwen_tokenizer

    with default_dtype(torch.bfloat16):
        qwen3("zimage/text_encoder.json", 2, True, False).save_pretrained(path / "text_encoder")
    tiny_qwen_tokenizer().save_pretrained(path / "tokenizer")
    flux1_vae().save_pretrained(path / "vae")
    flow_scheduler(path, shift=3.0, use_dynamic_shifting=False)


def write_wan(path: Path, ti2v: bool) -> None:
    from diffusers import UniPCMultistepScheduler
    from wan_fixtures import SCHEDULER, tiny_umt5_tokenizer

    with default_dtype(torch.bfloat16):
        umt5().save_pretrained(path / "text_encoder")
    tiny_umt5_tokenizer().save_pretrained(path / "tokenizer")
    wan_vae(ti2v).save_pretrained(path / "vae")
    UniPCMultistepScheduler(**dict(SCHEDULER, flow_shift=5.0 if ti2v else 3.0)).save_pretrained(path / "scheduler")
    if ti2v:  # Wan2.2-TI2V-5B-Diffusers' model_index.json: one timestep per latent token
        (path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))


SHAPES: dict[str, Shape] = {
    "flux2_klein_4b": Shape("flux2", "configs/flux2/flow_dpo_lora.yaml", "flux2/transformer_klein_4b.json",
                            {"num_layers": 1, "num_single_layers": 1}, lambda p: write_flux2(p, False), 4),
    "flux2_dev": Shape("flux2_dev", "configs/flux2/flow_dpo_lora_dev.yaml", "flux2/transformer_dev.json",
                       {"num_layers": 1, "num_single_layers": 0}, lambda p: write_flux2(p, True), 4),
    "qwen_image": Shape("qwen_image", "configs/qwen_image/flow_dpo_lora.yaml", "qwen_image/transformer.json",
                        {"num_layers": 1}, write_qwen_image, 4),
    "zimage": Shape("zimage", "configs/zimage/flow_dpo_lora.yaml", "zimage/transformer.json",
                    {"n_layers": 1, "n_refiner_layers": 1}, write_zimage, 4),
    "wan2_1_t2v_1_3b": Shape("wan", "configs/wan/flow_dpo_lora.yaml", "wan/transformer_t2v_1_3b.json",
                             {"num_layers": 1}, lambda p: write_wan(p, False), 8, video=True),
    "wan2_2_ti2v_5b": Shape("wan", "configs/wan/flow_dpo_lora.yaml", "wan/transformer_ti2v_5b.json",
                            {"num_layers": 1}, lambda p: write_wan(p, True), 16, video=True),
}


def write_folder(shape: Shape, path: Path) -> Path:
    """The run's pipeline folder: the published transformer at reduced depth (bf16, random) and
    `shape.write`'s parts."""
    import diffusers

    name = json.loads((ROOT / "configs" / shape.transformer).read_text())["_class_name"]
    with default_dtype(torch.bfloat16):
        transformer = getattr(diffusers, name).from_config({**published(shape.transformer), **shape.depth})
        transformer.save_pretrained(path / "transformer")
        del transformer
    shape.write(path)
    return path
