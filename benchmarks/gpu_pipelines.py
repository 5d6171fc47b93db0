"""Pipeline rows of `python -m benchmarks.gpu --quick`, built from published configs with random
weights and saved as a diffusers folder, so mmalign's own family loaders read them:

- `sd15_lora`: Diffusion-DPO on the SD1.5 UNet (860 M; `runwayml/stable-diffusion-v1-5`
  unet/config.json), its VAE (factor 8, scaling 0.18215) and CLIP ViT-L text encoder, 512 px,
  LoRA r 64 on the attention projections. mmalign (`PreferenceTrainer` on a real `mmalign
  cache`, reference = adapters off, no checkpointing) vs the official loop
  (`benchmarks.diffusion_dpo.recipe_step`: VAE + text encoder every step, checkpointing on, a
  frozen fp32 copy of the base UNet as reference), same pairs, seeds and draws.
- `flux_cache`: Flow-DPO on a FLUX.1-shaped transformer (FLUX widths: 24 heads x 128, joint
  width 4096, 16-channel VAE; `--flux-blocks` double + 2x that single blocks of 19 + 38), CLIP-L
  and a T5 of T5-XXL's width (d_model 4096, d_ff 10240, 64 heads; `--t5-layers` of 24, bf16),
  prompts padded to 512 T5 tokens, LoRA r 64: `PreferenceTrainer` uncached (VAE, CLIP and T5
  every step) vs cached (`mmalign cache` first: no text encoder loaded), same draws.
`--tiny`: the same code on CPU with tiny widths.
"""

from __future__ import annotations

import json
import string
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.gpu import LORA_UNET, Device, PhaseClock, Settings, attempt, run_steps

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TINY = {"sd15_unet": dict(sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                          attention_head_dim=4, norm_num_groups=16),
        "vae": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16),
        "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        "flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        "t5": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)}
T5_WORDS = ["a", "photo", "of", "thing", "number", "on", "table", "red", "blue", "cat", "dog", "house"]


def _part(name: str, full: dict[str, Any], s: Settings) -> dict[str, Any]:
    return {**full, **(TINY[name] if s.tiny else {})}


def clip_tokenizer() -> Any:
    from benchmarks.gpu_sdxl import clip_tokenizer as make

    return make()


def t5_tokenizer(tiny: bool) -> Any:
    """Word-level T5-style tokenizer (<pad> 0, </s> 1 appended), FLUX.1-dev's 512 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(T5_WORDS + list(string.digits))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=32 if tiny else 512)


def save_sd15(path: Path, s: Settings, device: Any) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(s.seed)
    with torch.device(device):
        UNet2DConditionModel(**_part("sd15_unet", SD15_UNET, s)).save_pretrained(path / "unet")
        AutoencoderKL(**_part("vae", SD_VAE, s)).save_pretrained(path / "vae")
        CLIPTextModel(CLIPTextConfig(**_part("clip", CLIP_L, s), bos_token_id=0, eos_token_id=1,
                                     pad_token_id=1)).save_pretrained(path / "text_encoder")
    clip_tokenizer().save_pretrained(path / "tokenizer")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear").save_pretrained(path / "scheduler")


def save_flux(path: Path, s: Settings, device: Any) -> None:
    """FLUX-shaped pipeline; the transformer and T5 in bf16 on GPU (fp32 with --tiny)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    dtype = torch.float32 if s.tiny else torch.bfloat16
    torch.manual_seed(s.seed)
    blocks = {} if s.tiny else {"num_layers": s.flux_blocks, "num_single_layers": 2 * s.flux_blocks}
    with torch.device(device):
        FluxTransformer2DModel(**{**_part("flux", FLUX, s), **blocks}).to(dtype).save_pretrained(path / "transformer")
        AutoencoderKL(**_part("vae", FLUX_VAE, s)).save_pretrained(path / "vae")
        CLIPTextModel(CLIPTextConfig(**_part("clip", CLIP_L, s), bos_token_id=0, eos_token_id=1,
                                     pad_token_id=1)).save_pretrained(path / "text_encoder")
        t5 = {**_part("t5", T5_XXL, s), **({} if s.tiny else {"num_layers": s.t5_layers})}
        T5EncoderModel(T5Config(**t5)).to(dtype).save_pretrained(path / "text_encoder_2")
    clip_tokenizer().save_pretrained(path / "tokenizer")
    t5_tokenizer(s.tiny).save_pretrained(path / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(path / "scheduler")


def write_pairs(folder: Path, resolution: int, count: int, seed: int) -> Path:
    """`count` pairs of smooth random PNGs at `resolution`, 4 distinct captions (T5 words only)."""
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng, lines = np.random.default_rng(seed), []
    for i in range(count):
        names = []
        for side in ("c", "r"):
            small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            small.resize((resolution, resolution), Image.BILINEAR).save(folder / "images" / f"{i}{side}.png")
            names.append(f"images/{i}{side}.png")
        lines.append(json.dumps({"prompt": f"a photo of thing number {i % 4}", "chosen": names[0], "rejected": names[1]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def pipeline_config(folder: Path, s: Settings, modality: str, run: str, cached: bool, checkpointing: bool,
                    resolution: int, beta: float, dtype: str = "float32") -> Any:
    from mmalign.config import Config, from_dict

    return from_dict(Config, {
        "modality": modality, "model": {"path": str(folder / "pipeline"), "gradient_checkpointing": checkpointing,
                                        "dtype": dtype},
        "lora": {"enabled": True, "r": s.lora_rank, "alpha": s.lora_rank, "target_modules": LORA_UNET},
        "data": {"train": str(folder / "train.jsonl")},
        "diffusion": {"resolution": resolution, "random_flip": True, "caption_dropout": 0.2, "cache_dtype": "float32",
                      "vae_batch_size": 1,  # as the cache writes: same kernels, bit-equal latents on GPU
                      "cache_dir": str(folder / "cache") if cached else ""},
        "loss": {"name": "dpo", "beta": beta}, "reference": {"strategy": "lora_disabled"},
        "optim": {"name": "adamw", "lr": 1e-8, "weight_decay": 0.0},
        "train": {"output_dir": str(folder / f"run_{run}"), "max_steps": s.steps + 1, "batch_size": s.sdxl_batch,
                  "seed": s.seed, "progress": False, "tensorboard": False, "mixed_precision": "bf16", "cpu": s.tiny}})


def build_cache(cfg: Any, dev: Device) -> dict[str, Any]:
    """`mmalign cache`'s work (VAE + every text encoder once), timed; the encoders are then freed."""
    from mmalign.families import get_family
    from mmalign.modalities.cache_writer import write_cache

    tic = time.perf_counter()
    _, likelihood, _ = get_family(cfg.modality).build(cfg, use_cache=False, trained=False)
    likelihood.to(dev.device)
    write_cache(cfg, likelihood)
    dev.sync()
    seconds = time.perf_counter() - tic
    del likelihood
    dev.free()
    size = sum(p.stat().st_size for p in Path(cfg.diffusion.cache_dir).rglob("*") if p.is_file())
    return {"cache_seconds": seconds, "cache_mib": size / 2**20}


def trainer_side(cfg: Any, s: Settings, dev: Device) -> dict[str, Any]:
    """`PreferenceTrainer.train_step()` on `cfg` (cached or not), phases timed."""
    from mmalign.modalities import build_modality
    from mmalign.modalities.text import TextConditioning
    from mmalign.train.trainer import PreferenceTrainer

    dev.reset_peak()
    model, likelihood, _ = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, model, likelihood)
    clock = PhaseClock(dev.sync)
    clock.wrap_likelihood(likelihood)
    clock.wrap(trainer.accelerator, "backward", "backward")
    clock.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    clock.wrap(trainer.optimizer, "step", "optimizer")
    out = run_steps(lambda: trainer.train_step()["loss"], clock, dev, s, s.sdxl_batch)
    return {**out, "reference": trainer.strategy, "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "loaded_vae": likelihood.vae is not None,
            "loaded_text_encoders": isinstance(likelihood.conditioning, TextConditioning)}


def recipe_side(cfg: Any, s: Settings, dev: Device) -> dict[str, Any]:
    """The official Diffusion-DPO loop (`recipe_step`) on the family's uncached likelihood: VAE +
    text encoder every step, gradient checkpointing, a frozen fp32 copy of the base UNet."""
    import copy

    import torch

    from benchmarks.diffusion_dpo import recipe_step
    from mmalign.data.preference import StreamSampler, load_preference_data
    from mmalign.families import get_family
    from mmalign.train.optim import build_optimizer
    from mmalign.train.setup import apply_lora
    from mmalign.train.trainer import step_seed

    dev.reset_peak()
    unet, likelihood, _ = get_family(cfg.modality).build(cfg, use_cache=False, trained=True)
    likelihood.to(dev.device)
    unet = unet.to(dev.device)
    ref = copy.deepcopy(unet).requires_grad_(False).eval()
    model = apply_lora(unet, cfg).train()
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    records, _ = load_preference_data(cfg.data.train)
    sampler, clock, state = StreamSampler(len(records), s.seed), PhaseClock(dev.sync), {"step": 0}
    clock.wrap_likelihood(likelihood)
    autocast = lambda: torch.autocast(dev.device.type, dtype=torch.bfloat16)  # noqa: E731

    def step() -> torch.Tensor:
        seed = step_seed(s.seed, state["step"], 0, 0)
        torch.manual_seed(seed)
        idx = sampler.micro_batch(state["step"], s.sdxl_batch, 0, 1)
        batch = likelihood.collate([dict(records[i], _index=i) for i in idx], "pair").to(dev.device)
        values = likelihood.draw(batch, torch.Generator().manual_seed(seed)).to(dev.device).values
        loss = recipe_step(likelihood, model, ref, values, clock, beta=s.beta, optimizer=optimizer,
                           max_grad_norm=cfg.optim.max_grad_norm, autocast=autocast)
        state["step"] += 1
        return loss

    out = run_steps(step, clock, dev, s, s.sdxl_batch)
    return {**out, "reference": "frozen copy (float32)", "gradient_checkpointing": True, "loaded_vae": True}


def cached_side(config: Callable[[bool], Any], s: Settings, dev: Device) -> Callable[[bool], dict[str, Any]]:
    """The trainer side on a cache it writes first (once, however often `attempt` retries), so an
    error while caching is this side's result, not the row's (which would lose the other side)."""
    cache: dict[str, Any] = {}

    def run(checkpointing: bool) -> dict[str, Any]:
        if not cache:
            cache.update(build_cache(config(False), dev))
        return {**trainer_side(config(checkpointing), s, dev), **cache}

    return run


def _compare(sides: dict[str, dict[str, Any]], new: str, old: str) -> dict[str, Any]:
    a, b = sides[new], sides[old]
    if "error" in a or "error" in b:
        return {}
    return {"speedup": a["pairs_per_s"] / b["pairs_per_s"], "memory_ratio": a["peak_mib"] / b["peak_mib"],
            "first_losses": {k: sides[k]["losses"][:3] for k in sides},
            "max_loss_diff_first3": max(abs(x - y) for x, y in zip(a["losses"][:3], b["losses"][:3]))}


def sd15_row(work: Path, s: Settings, dev: Device) -> dict[str, Any]:
    folder, resolution = work / "sd15", 64 if s.tiny else 512
    save_sd15(folder / "pipeline", s, dev.device)
    write_pairs(folder, resolution, 4 * s.sdxl_batch, s.seed)
    config = lambda side, cached, c: pipeline_config(folder, s, "sd", side, cached, c, resolution, s.beta)  # noqa: E731
    sides = {"recipe": attempt(lambda c: recipe_side(config("recipe", False, True), s, dev), "on", dev)}
    dev.free()
    sides["mmalign"] = attempt(cached_side(lambda c: config("mmalign", True, c), s, dev), s.checkpointing, dev)
    dev.free()
    return {"name": "sd15_lora", "sides": sides, **_compare(sides, "mmalign", "recipe"),
            "what": (f"SD1.5 UNet{' (tiny)' if s.tiny else ''} {resolution}px, {s.sdxl_batch} pair(s)/step, bf16 "
                     f"autocast, fp32 weights, LoRA r{s.lora_rank} (attention), AdamW"),
            "differs": "mmalign: cached latents/text, reference adapters off; recipe: VAE + text encoder every "
                       "step, frozen fp32 copy, checkpointing on"}


def flux_row(work: Path, s: Settings, dev: Device) -> dict[str, Any]:
    """Flow-DPO uncached vs cached: the same trainer, draws and pairs; only where the latents and
    the text (CLIP + T5) come from differs."""
    folder, resolution = work / "flux", 32 if s.tiny else 512
    save_flux(folder / "pipeline", s, dev.device)
    write_pairs(folder, resolution, 4 * s.sdxl_batch, s.seed)
    dtype = "float32" if s.tiny else "bfloat16"
    config = lambda side, cached, c: pipeline_config(folder, s, "flux", side, cached, c, resolution,  # noqa: E731
                                                     s.flow_beta, dtype)
    sides = {"uncached": attempt(lambda c: trainer_side(config("uncached", False, c), s, dev), s.checkpointing, dev)}
    dev.free()
    sides["cached"] = attempt(cached_side(lambda c: config("cached", True, c), s, dev), s.checkpointing, dev)
    dev.free()
    blocks = "tiny" if s.tiny else f"{s.flux_blocks} double + {2 * s.flux_blocks} single blocks, T5 {s.t5_layers} layers"
    return {"name": "flux_cache", "sides": sides, **_compare(sides, "cached", "uncached"),
            "what": (f"Flow-DPO, FLUX.1-shaped transformer ({blocks}), {resolution}px, {s.sdxl_batch} pair(s)/step, "
                     f"{dtype} weights + bf16 autocast, LoRA r{s.lora_rank}, reference adapters off"),
            "differs": "cached: latents + CLIP/T5 outputs read from `mmalign cache`, no text encoder loaded; "
                       "uncached: VAE, CLIP and T5 every step"}
