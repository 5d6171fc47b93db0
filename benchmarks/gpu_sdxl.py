"""The SDXL rows of the GPU section (`python -m benchmarks.gpu`, whose docstring describes them):
Diffusion-DPO on the full-size SDXL base UNet, mmalign (`PreferenceTrainer` on a real `mmalign
cache`) vs the reference recipe's loop (VAE + both text encoders every step, gradient
checkpointing, frozen reference copy), with the same pairs, order, step seeds and draws."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.diffusion_dpo import recipe_step
from benchmarks.gpu import (BIGG_TEXT, CLIP_L_TEXT, LORA_UNET, SDXL_UNET, SDXL_VAE, TINY, Device, PhaseClock, Settings,
                            attempt, run_steps)

def sdxl_parts(s: Settings) -> dict[str, dict[str, Any]]:
    tiny = TINY if s.tiny else {}
    return {"unet": {**SDXL_UNET, **tiny.get("unet", {})}, "vae": {**SDXL_VAE, **tiny.get("vae", {})},
            "text": {**CLIP_L_TEXT, **tiny.get("text", {})}, "text_2": {**BIGG_TEXT, **tiny.get("text_2", {})}}


def build_unet(s: Settings, device: Any) -> Any:
    """SDXL UNet from its config, random fp32 weights (seeded), built on `device`."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(s.seed)
    with torch.device(device):
        return UNet2DConditionModel(**sdxl_parts(s)["unet"])


def clip_tokenizer() -> Any:
    """A character-level CLIPTokenizer (no merges file offline), padding to 77 like SDXL's."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def sdxl_likelihood(cfg: Any, s: Settings, device: Any, text_dtype: Any) -> Any:
    """Uncached SDXL likelihood with the VAE (fp32) and both text encoders (`text_dtype`) on `device`."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mmalign.families import sdxl
    from mmalign.modalities.diffusion import DiffusionLikelihood, ElboObjective, ImageLatents
    from mmalign.modalities.text import TextConditioning

    parts = sdxl_parts(s)
    torch.manual_seed(s.seed + 1)
    with torch.device(device):
        vae = AutoencoderKL(**parts["vae"])
        encoders = [cls(CLIPTextConfig(**parts[key], bos_token_id=0, eos_token_id=1, pad_token_id=1)).to(text_dtype)
                    for key, cls in (("text", CLIPTextModel), ("text_2", CLIPTextModelWithProjection))]
    d = cfg.diffusion
    text = TextConditioning(sdxl.SDXLText(encoders, [clip_tokenizer()] * 2), d.null_prompt)
    return DiffusionLikelihood(sdxl.FAMILY, ElboObjective(sdxl_scheduler(), d.prediction_type),
                               ImageLatents(vae, d, [Path(cfg.data.train).parent]), text,
                               sdxl.SDXLUNet(d.resolution), d)


def sdxl_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def write_sdxl_pairs(work: Path, s: Settings) -> Path:
    """4 x batch pairs of smooth random res x res PNGs, 4 distinct captions."""
    import numpy as np
    from PIL import Image

    (work / "images").mkdir(parents=True, exist_ok=True)
    rng, lines = np.random.default_rng(s.seed), []
    for i in range(4 * s.sdxl_batch):
        names = []
        for side in ("c", "r"):
            small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            small.resize((s.resolution, s.resolution), Image.BILINEAR).save(work / "images" / f"{i}{side}.png")
            names.append(f"images/{i}{side}.png")
        lines.append(json.dumps({"prompt": f"a photo of thing number {i % 4}", "chosen": names[0], "rejected": names[1]}))
    (work / "sdxl_pairs.jsonl").write_text("\n".join(lines) + "\n")
    return work / "sdxl_pairs.jsonl"


def sdxl_config(work: Path, s: Settings, lora: bool, side: str, checkpointing: bool) -> Any:
    from mmalign.config import Config, from_dict

    return from_dict(Config, {
        "modality": "sdxl", "model": {"path": str(work), "gradient_checkpointing": checkpointing},
        "lora": {"enabled": lora, "r": s.lora_rank, "alpha": s.lora_rank, "target_modules": LORA_UNET},
        "data": {"train": str(work / "sdxl_pairs.jsonl")},
        "diffusion": {"resolution": s.resolution, "random_flip": True, "caption_dropout": 0.2, "cache_dtype": "float32",
                      "vae_batch_size": 1,  # as the cache writes: same kernels, bit-equal latents on GPU
                      "cache_dir": str(work / "sdxl_cache") if side == "mmalign" else ""},
        "loss": {"name": "dpo", "beta": s.beta}, "reference": {"strategy": "lora_disabled" if lora else "frozen"},
        "optim": {"name": "adamw" if lora else "adafactor", "lr": 1e-8, "weight_decay": 0.0 if lora else 1e-2},
        "train": {"output_dir": str(work / f"run_{side}"), "max_steps": s.steps + 1, "batch_size": s.sdxl_batch,
                  "seed": s.seed, "progress": False, "tensorboard": False, "mixed_precision": "bf16", "cpu": s.tiny}})


def build_sdxl_cache(work: Path, s: Settings, dev: Device) -> dict[str, Any]:
    """`mmalign cache`'s work, once for both SDXL rows: full-size VAE + text encoders, then freed."""
    import torch

    from mmalign.modalities.cache_writer import write_cache

    cfg = sdxl_config(work, s, False, "mmalign", False)
    if (work / "sdxl_cache" / "index.json").is_file():
        return {}
    tic = time.perf_counter()
    likelihood = sdxl_likelihood(cfg, s, dev.device, torch.bfloat16)
    write_cache(cfg, likelihood)
    dev.sync()
    seconds = time.perf_counter() - tic
    del likelihood
    dev.free()
    size = sum(p.stat().st_size for p in (work / "sdxl_cache").rglob("*") if p.is_file())
    return {"cache_seconds": seconds, "cache_mib": size / 2**20}


def sdxl_mmalign(work: Path, s: Settings, dev: Device, lora: bool, checkpointing: bool) -> dict[str, Any]:
    """PreferenceTrainer on the cache: no VAE or text encoder in memory."""
    from mmalign.families import sdxl
    from mmalign.modalities.diffusion import DiffusionLikelihood, ElboObjective
    from mmalign.modalities.diffusion_cache import CachedLatents, CachedText, LatentCache
    from mmalign.train.trainer import PreferenceTrainer

    cache_info = build_sdxl_cache(work, s, dev)
    cfg = sdxl_config(work, s, lora, "mmalign", checkpointing)
    dev.reset_peak()
    unet = build_unet(s, dev.device)
    cache = LatentCache(cfg.diffusion.cache_dir)
    cache.check(cfg, {"train": 4 * s.sdxl_batch}, unet.config.in_channels)
    d = cfg.diffusion
    likelihood = DiffusionLikelihood(sdxl.FAMILY, ElboObjective(sdxl_scheduler(), d.prediction_type),
                                     CachedLatents(cache, d), CachedText(cache, d.null_prompt),
                                     sdxl.SDXLUNet(d.resolution), d)
    trainer = PreferenceTrainer(cfg, unet, likelihood)
    clock = PhaseClock(dev.sync)
    clock.wrap_likelihood(likelihood)
    clock.wrap(trainer.accelerator, "backward", "backward")
    clock.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    clock.wrap(trainer.optimizer, "step", "optimizer")
    out = run_steps(lambda: trainer.train_step()["loss"], clock, dev, s, s.sdxl_batch)
    return {**out, **cache_info, "reference": trainer.strategy, "gradient_checkpointing": checkpointing,
            "loaded_vae": likelihood.vae is not None}


def sdxl_recipe(work: Path, s: Settings, dev: Device, lora: bool, checkpointing: bool = True) -> dict[str, Any]:
    """The official loop: VAE + text encoders every step, checkpointing, frozen bf16 reference copy."""
    import torch

    from mmalign.data.preference import StreamSampler, load_preference_data
    from mmalign.train.optim import build_optimizer
    from mmalign.train.setup import apply_lora
    from mmalign.train.trainer import step_seed

    cfg = sdxl_config(work, s, lora, "recipe", checkpointing)
    dev.reset_peak()
    likelihood = sdxl_likelihood(cfg, s, dev.device, torch.bfloat16)
    unet = build_unet(s, dev.device)
    ref_dtype = getattr(torch, s.recipe_ref_dtype)  # bfloat16: the official script's weight_dtype cast
    ref = torch.nn.Module.to(copy.deepcopy(unet).requires_grad_(False).eval(), ref_dtype)
    model = apply_lora(unet, cfg).train()  # enables checkpointing; LoRA with mmalign's exact settings
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
                           max_grad_norm=cfg.optim.max_grad_norm, autocast=autocast, ref_dtype=ref_dtype)
        state["step"] += 1
        return loss

    out = run_steps(step, clock, dev, s, s.sdxl_batch)
    return {**out, "reference": f"frozen copy ({s.recipe_ref_dtype})", "gradient_checkpointing": checkpointing,
            "loaded_vae": True}



def sdxl_row(work: Path, s: Settings, dev: Device, lora: bool) -> dict[str, Any]:
    sides = {"recipe": attempt(lambda c: sdxl_recipe(work, s, dev, lora, c), "on", dev)}
    dev.free()
    sides["mmalign"] = attempt(lambda c: sdxl_mmalign(work, s, dev, lora, c), s.checkpointing, dev)
    dev.free()
    mm, rec = sides["mmalign"], sides["recipe"]
    row = {"name": "sdxl_lora" if lora else "sdxl_full", "sides": sides,
           "what": (f"SDXL UNet {s.resolution}px, {s.sdxl_batch} pair(s)/step, bf16 autocast, fp32 weights, "
                    + (f"LoRA r{s.lora_rank} (attention), AdamW" if lora else "full fine-tune, Adafactor")),
           "differs": "mmalign: cached latents/text, reference " + ("adapters off" if lora else "frozen fp32 copy")
                      + "; recipe: VAE + text encoders every step, frozen "
                      + f"{s.recipe_ref_dtype} copy, checkpointing on"}
    if "error" not in mm and "error" not in rec:
        useful = mm["step_flops"] if not mm["gradient_checkpointing"] else None  # the UNet work alone
        for side in (mm, rec):
            side["model_tflops"] = useful / side["step_ms_mean"] / 1e9 if useful else None
        row.update(speedup=mm["pairs_per_s"] / rec["pairs_per_s"], memory_ratio=mm["peak_mib"] / rec["peak_mib"],
                   model_flops=useful, first_losses={k: sides[k]["losses"][:3] for k in sides},
                   max_loss_diff_first3=max(abs(a - b) for a, b in zip(mm["losses"][:3], rec["losses"][:3])))
    return row


