"""Image rows at real architecture on CPU (issue 20 item 4): Diffusion-DPO on SD1.5 and SDXL,
Flow-DPO cache.

Every row is built from published configs with random weights (`benchmarks.gpu_pipelines`:
SD15_UNET = runwayml/stable-diffusion-v1-5 unet/config.json, SD_VAE, CLIP_L, FLUX, T5_XXL;
`benchmarks.gpu`: SDXL_UNET, SDXL_VAE, CLIP_L_TEXT, BIGG_TEXT = stabilityai/stable-diffusion-xl-
base-1.0), saved as diffusers folders that mmalign's family loaders read, batch 1 pair,
`--resolution` px (default 256: latents 4 x 32 x 32), LoRA r `--lora-rank` on the attention
projections (to_q/k/v/out.0), AdamW.

- `sd15`: Diffusion-DPO on the full SD1.5 UNet (860 M), its VAE and CLIP ViT-L text encoder.
  * `recipe`: the official Diffusion-DPO loop (`diffusion_dpo.recipe_step`): every step decodes
    the PNGs and runs the VAE and the text encoder (mmalign's uncached draw), gradient
    checkpointing on, a frozen fp32 copy of the base UNet as reference.
  * `mmalign`: `PreferenceTrainer.train_step()` on the `mmalign cache` (float32, written once,
    timed apart), reference = LoRA adapters off, no gradient checkpointing.
- `sdxl` (own `make bench` line, `--rows sdxl`): the same two sides on the full SDXL base UNet
  (2.57 B), its VAE, CLIP ViT-L and OpenCLIP bigG text encoders. The frozen base weights (UNet,
  both text encoders) are bf16 and every UNet call runs under bf16 autocast; LoRA parameters
  (and AdamW's state) and the VAE are fp32. diffusers' train_diffusion_dpo_sdxl.py casts the UNet
  and text encoders to `weight_dtype` (bf16 with --mixed_precision bf16) and keeps the VAE fp32;
  its adapters, added after the cast, stay bf16 (it upcasts them only for fp16), while peft's
  `get_peft_model` (mmalign's LoRA, both sides here) keeps them fp32. Two fp32 SDXL UNets
  (2 x 10.3 GB) would not fit a 23 GB machine. The recipe's reference is a frozen copy of that
  bf16 base, as SalesforceAIResearch/DiffusionDPO train.py keeps its `ref_unet` (cast to
  `weight_dtype`; diffusers' LoRA script disables the adapters instead). mmalign runs
  `model.dtype: bfloat16` + `train.mixed_precision: bf16` on CPU. Both sides run the same bf16
  kernels on the same weights and inputs, so their losses are bit-equal (measured: |Δ| 0).
- `flux`: Flow-DPO on a FLUX.1-shaped transformer (FLUX's 128-wide heads, `--flux-heads` of 24,
  `--flux-blocks` double + single blocks of 19 + 38, 16-channel VAE) with CLIP-L and a T5 of
  T5-XXL's width (d_model 4096, d_ff 10240, 64 heads; `--t5-layers` of 24), prompts padded to
  `--t5-tokens` (FLUX.1-schnell's 256): `PreferenceTrainer` uncached (VAE, CLIP and T5 every step)
  vs cached (no text encoder and no VAE loaded), the same draws.

Each side runs in a fresh interpreter (`measure.run_side`: peak RSS growth over its baseline);
every side gets the same pairs, order, step seeds and draws (t, ε, flips, dropped captions), so
the losses of the two sides of a row must agree (`--loss-tol`), else exit 1. Phases per step
(`gpu.PhaseClock`, no device sync on CPU): collate, draw, VAE, text encoders, policy and
reference forward, backward, optimizer.

    python -m benchmarks.pipelines_real                      # sd15 + flux, ~6 minutes on 2 idle CPU cores
    python -m benchmarks.pipelines_real --rows sdxl --steps 2 --warmup 1 --num-pairs 2   # ~2.5 minutes, 17 GB free RAM
    python -m benchmarks.pipelines_real --tiny --steps 2     # tiny widths, the CI size
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import gpu, gpu_pipelines, measure

ROWS = {"sd15": ("recipe", "mmalign"), "sdxl": ("recipe", "mmalign"), "flux": ("uncached", "cached")}
MODALITY = {"sd15": "sd", "sdxl": "sdxl", "flux": "flux"}
# sdxl: frozen base weights (UNet, both text encoders) in bf16 under bf16 autocast, LoRA and VAE in
# fp32, as diffusers' train_diffusion_dpo_sdxl.py casts them (`weight_dtype`); two fp32 SDXL UNets
# (2 x 10.3 GB) do not fit a 23 GB machine.
SDXL_DTYPE = "bfloat16"


@dataclasses.dataclass
class Settings:
    rows: str = "sd15,flux"
    steps: int = 3
    warmup: int = 1
    resolution: int = 256
    lora_rank: int = 64
    lr: float = 1e-4
    beta: float = 5000.0
    flow_beta: float = 2000.0
    flux_blocks: int = 1
    flux_heads: int = 4
    t5_layers: int = 1
    t5_tokens: int = 256
    num_pairs: int = 4
    batch_size: int = 1  # pairs per step (the official recipes: 1 per device)
    seed: int = 0
    threads: int = 2
    tiny: bool = False
    # beta 5000 amplifies float rounding of the encoders' batch composition (cache vs per step)
    loss_tol: float = 1e-3


def _gpu_settings(s: Settings) -> gpu.Settings:
    return gpu.Settings(tiny=s.tiny, seed=s.seed, steps=s.steps, warmup=s.warmup, lora_rank=s.lora_rank,
                        sdxl_batch=s.batch_size, beta=s.beta, flow_beta=s.flow_beta)


def save_flux(path: Path, s: Settings) -> None:
    """FLUX-shaped pipeline in float32: the transformer reduced in heads and blocks, T5 at T5-XXL's
    width with `t5_layers` layers (tiny widths with `s.tiny`)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    g = _gpu_settings(s)
    part = gpu_pipelines._part
    torch.manual_seed(s.seed)
    shape = {} if s.tiny else {"num_layers": s.flux_blocks, "num_single_layers": s.flux_blocks,
                               "num_attention_heads": s.flux_heads}
    FluxTransformer2DModel(**{**part("flux", gpu_pipelines.FLUX, g), **shape}).save_pretrained(path / "transformer")
    AutoencoderKL(**part("vae", gpu_pipelines.FLUX_VAE, g)).save_pretrained(path / "vae")
    CLIPTextModel(CLIPTextConfig(**part("clip", gpu_pipelines.CLIP_L, g), bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(path / "text_encoder")
    t5 = {**part("t5", gpu_pipelines.T5_XXL, g), **({} if s.tiny else {"num_layers": s.t5_layers})}
    T5EncoderModel(T5Config(**t5)).save_pretrained(path / "text_encoder_2")
    gpu_pipelines.clip_tokenizer().save_pretrained(path / "tokenizer")
    tok = gpu_pipelines.t5_tokenizer(s.tiny)
    tok.model_max_length = min(tok.model_max_length, s.t5_tokens)
    tok.save_pretrained(path / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(path / "scheduler")


def save_sdxl(path: Path, s: Settings) -> None:
    """SDXL pipeline (`gpu_sdxl.sdxl_parts`: stabilityai/stable-diffusion-xl-base-1.0's UNet, VAE,
    CLIP ViT-L and OpenCLIP bigG text configs): the UNet (2.57 B) built directly in bf16 (an fp32
    build takes 10.3 GB) and saved in 1 GB shards, both text encoders in bf16, the VAE in fp32."""
    import gc

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from benchmarks import gpu_sdxl

    parts, dtype = gpu_sdxl.sdxl_parts(_gpu_settings(s)), getattr(torch, SDXL_DTYPE)
    torch.manual_seed(s.seed)
    torch.set_default_dtype(dtype)
    try:
        UNet2DConditionModel(**parts["unet"]).save_pretrained(path / "unet", max_shard_size="1GB")
        gc.collect()
    finally:
        torch.set_default_dtype(torch.float32)
    AutoencoderKL(**parts["vae"]).save_pretrained(path / "vae")
    for key, cls, sub in (("text", CLIPTextModel, "text_encoder"),
                          ("text_2", CLIPTextModelWithProjection, "text_encoder_2")):
        cls(CLIPTextConfig(**parts[key], bos_token_id=0, eos_token_id=1, pad_token_id=1)).to(dtype).save_pretrained(
            path / sub)
    for sub in ("tokenizer", "tokenizer_2"):
        gpu_sdxl.clip_tokenizer().save_pretrained(path / sub)
    gpu_sdxl.sdxl_scheduler().save_pretrained(path / "scheduler")


def config(work: Path, s: Settings, row: str, side: str) -> Any:
    """The row's mmalign config for `side` (CPU, LoRA, reference adapters off): fp32 (sd15, flux) or
    bf16 base weights under bf16 autocast (sdxl)."""
    cached = side in ("mmalign", "cached")
    beta, bf16 = s.flow_beta if row == "flux" else s.beta, row == "sdxl"
    cfg = gpu_pipelines.pipeline_config(work / row, _gpu_settings(s), MODALITY[row], f"{side}_{time.time_ns()}",
                                        cached, False, resolution(s), beta, SDXL_DTYPE if bf16 else "float32")
    cfg.train.mixed_precision, cfg.train.cpu, cfg.train.max_steps, cfg.optim.lr = ("bf16" if bf16 else "no", True,
                                                                                   s.steps, s.lr)
    return cfg


def resolution(s: Settings) -> int:
    return 64 if s.tiny else s.resolution


def prepare(work: Path, s: Settings) -> dict[str, Any]:
    """Save each row's pipeline and pairs and write its cache (timed); returns the cache stats."""
    from benchmarks.gpu import Device

    (work / "settings.json").write_text(json.dumps(dataclasses.asdict(s)))
    caches = {}
    for row in s.rows.split(","):
        folder = work / row / "pipeline"
        if row == "sd15":
            gpu_pipelines.save_sd15(folder, _gpu_settings(s), "cpu")
        else:
            (save_sdxl if row == "sdxl" else save_flux)(folder, s)
        gpu_pipelines.write_pairs(work / row, resolution(s), s.num_pairs, s.seed)
        caches[row] = gpu_pipelines.build_cache(config(work, s, row, ROWS[row][1]), Device(tiny=True))
    return caches


def param_dtypes(model: Any) -> dict[str, list[str]]:
    """The dtypes of the trainable (LoRA) and the frozen (base) parameters."""
    return {kind: sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad == grad})
            for kind, grad in (("trainable", True), ("frozen", False))}


def _steps(step: Any, clock: Any, s: Settings) -> dict[str, Any]:
    start, ends, losses = time.perf_counter(), [], []
    for i in range(s.steps):
        if i == s.warmup:
            clock.spent = dict.fromkeys(gpu.PHASES, 0.0)
        losses.append(float(step()))
        ends.append(time.perf_counter())
    timed = s.steps - s.warmup
    ms = {p: 1000 * v / timed for p, v in clock.spent.items()}
    ms["draw"] -= ms["vae"] + ms["text_encoders"]  # draw = its own work apart from the encoders
    ms["other"] = 1000 * (ends[-1] - (ends[s.warmup - 1] if s.warmup else start)) / timed - sum(ms.values())
    return {"start": start, "step_ends": ends, "losses": losses, "extra": {"ms_per_step": ms}}


def trainer_side(work: Path, s: Settings, row: str, side: str) -> dict[str, Any]:
    """`PreferenceTrainer.train_step()`, cached or not, phases timed."""
    from mmalign.modalities import build_modality
    from mmalign.modalities.text import TextConditioning
    from mmalign.train.trainer import PreferenceTrainer

    tic = time.perf_counter()
    cfg = config(work, s, row, side)
    model, likelihood, _ = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, model, likelihood)
    clock = gpu.PhaseClock(lambda: None)
    clock.wrap_likelihood(likelihood)
    clock.wrap(trainer.accelerator, "backward", "backward")
    clock.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    clock.wrap(trainer.optimizer, "step", "optimizer")
    setup = time.perf_counter() - tic
    out = _steps(lambda: trainer.train_step()["loss"], clock, s)
    out["extra"].update(reference=trainer.strategy, gradient_checkpointing=cfg.model.gradient_checkpointing,
                        param_dtypes=param_dtypes(trainer.unwrapped),
                        loaded_vae=likelihood.vae is not None,
                        loaded_text_encoders=isinstance(likelihood.conditioning, TextConditioning))
    return {**out, "setup_s": setup}


def recipe_side(work: Path, s: Settings, row: str = "sd15") -> dict[str, Any]:
    """The official Diffusion-DPO loop: VAE + text encoder(s) every step, checkpointing on, a frozen
    copy of the base UNet as reference (in the weights' dtype: fp32 for sd15, bf16 for sdxl, under
    bf16 autocast as the official scripts' mixed precision), LoRA on the policy."""
    import contextlib
    import copy

    import torch

    from benchmarks.diffusion_dpo import recipe_step
    from mmalign.data.preference import StreamSampler, load_preference_data
    from mmalign.families import get_family
    from mmalign.train.optim import build_optimizer
    from mmalign.train.setup import apply_lora
    from mmalign.train.trainer import step_seed

    tic = time.perf_counter()
    cfg = config(work, s, row, "recipe")
    unet, likelihood, _ = get_family(cfg.modality).build(cfg, use_cache=False, trained=True)
    dtype, bf16 = getattr(torch, cfg.model.dtype), cfg.train.mixed_precision == "bf16"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    ref = copy.deepcopy(unet).requires_grad_(False).eval()
    unet.enable_gradient_checkpointing()
    model = apply_lora(unet, cfg).train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    records, _ = load_preference_data(cfg.data.train)
    sampler, clock, state = StreamSampler(len(records), s.seed), gpu.PhaseClock(lambda: None), {"step": 0}
    clock.wrap_likelihood(likelihood)
    setup = time.perf_counter() - tic

    def step() -> Any:
        seed = step_seed(s.seed, state["step"], 0, 0)
        torch.manual_seed(seed)
        idx = sampler.micro_batch(state["step"], s.batch_size, 0, 1)
        batch = likelihood.collate([dict(records[i], _index=i) for i in idx], "pair")
        values = likelihood.draw(batch, torch.Generator().manual_seed(seed)).values
        state["step"] += 1
        return recipe_step(likelihood, model, ref, values, clock, beta=s.beta, optimizer=optimizer,
                           max_grad_norm=cfg.optim.max_grad_norm, autocast=autocast, ref_dtype=dtype,
                           policy_dtype=dtype)

    out = _steps(step, clock, s)
    out["extra"].update(reference=f"frozen copy ({cfg.model.dtype})", gradient_checkpointing=True, loaded_vae=True,
                        param_dtypes=param_dtypes(model),
                        loaded_text_encoders=True)
    return {**out, "setup_s": setup}


SIDES = {"sd15_recipe": recipe_side,
         "sd15_mmalign": lambda w, s: trainer_side(w, s, "sd15", "mmalign"),
         "sdxl_recipe": lambda w, s: recipe_side(w, s, "sdxl"),
         "sdxl_mmalign": lambda w, s: trainer_side(w, s, "sdxl", "mmalign"),
         "flux_uncached": lambda w, s: trainer_side(w, s, "flux", "uncached"),
         "flux_cached": lambda w, s: trainer_side(w, s, "flux", "cached")}


def load_settings(workdir: Path) -> Settings:
    return Settings(**json.loads((workdir / "settings.json").read_text()))


def _imports() -> None:
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401

    import mmalign.train.trainer  # noqa: F401


def row_summary(row: str, sides: dict[str, dict[str, Any]], cache: dict[str, Any], s: Settings) -> dict[str, Any]:
    """The row's ratio (new side / old side: mmalign/recipe, cached/uncached) and loss agreement."""
    old, new = (sides[k] for k in ROWS[row])
    diff = max(abs(a - b) for a, b in zip(old["losses"], new["losses"]))
    return {"sides": sides, "cache": cache, "speedup": new["pairs_per_s"] / old["pairs_per_s"],
            "memory_ratio": new["rss_growth_mib"] / old["rss_growth_mib"], "max_loss_diff": diff,
            "losses_agree": diff <= s.loss_tol}


def table(rows: dict[str, dict[str, Any]], s: Settings) -> str:
    tiny = " (tiny)" if s.tiny else ""
    what = {"sd15": f"Diffusion-DPO, SD1.5 UNet + VAE + CLIP-L{tiny}, fp32",
            "sdxl": (f"Diffusion-DPO, SDXL UNet + VAE + CLIP-L + OpenCLIP-bigG{tiny}, bf16 base weights + bf16 "
                     "autocast (LoRA and VAE fp32)"),
            "flux": (f"Flow-DPO, FLUX.1-shaped ({s.flux_heads} x 128 heads, {s.flux_blocks} + {s.flux_blocks} blocks), "
                     f"T5 d_model 4096 x {s.t5_layers} layer(s), {s.t5_tokens} T5 tokens, fp32" if not s.tiny else
                     "Flow-DPO, FLUX (tiny), fp32")}
    lines = [f"image rows at real architecture on CPU: {resolution(s)}px, batch {s.batch_size} pair(s), "
             f"LoRA r{s.lora_rank}, "
             f"{s.steps} steps ({s.warmup} warm-up), {s.threads} threads"]
    for row, r in rows.items():
        lines.append(f"{row}: {what[row]}")
        lines.append(f"  {'side':<10}{'pairs/s':>9}{'peak RSS +MiB':>15}{'CPU s':>8}  ms/step by phase")
        for name in ROWS[row]:
            x = r["sides"][name]
            ms = ", ".join(f"{k} {v:.0f}" for k, v in x["ms_per_step"].items() if abs(v) >= 0.5)
            lines.append(f"  {name:<10}{x['pairs_per_s']:>9.3f}{x['rss_growth_mib']:>15.0f}"
                         f"{x['process_cpu_s']:>8.0f}  {ms}")
        c = r["cache"]
        lines.append(f"  {ROWS[row][1]}/{ROWS[row][0]}: pairs/s x{r['speedup']:.2f}, "
                     f"peak memory x{r['memory_ratio']:.2f}; "
                     f"one-off cache {c['cache_seconds']:.1f} s / {c['cache_mib']:.1f} MiB; losses max |Δ| "
                     f"{r['max_loss_diff']:.1e} ({'agree' if r['losses_agree'] else 'DISAGREE'}, tol {s.loss_tol:g}); "
                     f"text encoders loaded in the step: "
                     + ", ".join(f"{k} {r['sides'][k]['loaded_text_encoders']}" for k in ROWS[row]))
    return "\n".join(lines)


def parse(argv: list[str] | None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipelines_real", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Settings):
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipelines_real.json")
    a = p.parse_args(argv)
    s = Settings(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Settings)})
    if not 0 < s.warmup < s.steps or set(s.rows.split(",")) - set(ROWS):
        p.error(f"need 0 < --warmup < --steps and --rows from {sorted(ROWS)}")
    return s, a.out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_side

    s, out = parse(argv)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mmalign_bench_pipelines_") as tmp:
        work = Path(tmp)
        tic = time.perf_counter()
        caches = prepare(work, s)
        prepare_s = time.perf_counter() - tic  # random weights built and saved, pairs, caches
        for row in s.rows.split(","):
            sides = {}
            for name in ROWS[row]:
                print(f"[bench] {row} {name} ...", flush=True)
                sides[name] = run_side(f"{row}_{name}", work, s.threads, f"{row}_{name}", "benchmarks.pipelines_real")
            rows[row] = row_summary(row, sides, caches[row], s)
    wall_s = time.perf_counter() - tic
    text = table(rows, s) + (f"\nprepare (random weights built and saved, pairs, caches) {prepare_s:.0f} s; "
                             f"whole command {wall_s:.0f} s wall")
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "pipelines_real", "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.pipelines_real " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "settings": dataclasses.asdict(s),
        "prepare_s": prepare_s, "wall_s": wall_s, "table": text, "rows": rows}, indent=1))
    print(f"\n[bench] wrote {out}")
    return 0 if all(r["losses_agree"] for r in rows.values()) else 1


if __name__ == "__main__":
    if "--side" in sys.argv:
        measure.run_side(__doc__, SIDES, load_settings, _imports, sys.argv[1:])
    else:
        sys.exit(main())
