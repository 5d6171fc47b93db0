"""Train the shipped toy text-to-image model `mmalign/data/toyworld/diffusion/` (pkg://toyworld/diffusion).

Rerun from the repository root (CPU, one thread, ~10 minutes on a shared 2-core machine):

    OMP_NUM_THREADS=1 .venv/bin/python pipelines/train_toy_diffusion.py

What it does (all seeded; the world and the models are in `mmalign/toyworld/`):
1. Renders `--n-images` 16×16 training images of the ``objects`` world (split train: held-out
   images and the held-out prompt combinations are never used).
2. Trains the one-block AutoencoderKL (3×16×16 <-> 4×16×16) to reconstruct them
   (MSE + a tiny KL: a nearly deterministic posterior), then sets its `scaling_factor` to 1 / std of the latent means.
3. Trains the UNet and the CLIP text encoder jointly on the latents (ε-prediction, SD's
   scaled-linear DDPM schedule, 10 % of captions dropped to "" so classifier-free guidance
   works), AdamW with warm-up and cosine decay.
4. Saves a StableDiffusionPipeline folder in fp16 safetensors (DDIM sampling scheduler),
   reloads it in float32 and prints the exact checker's mean on every prompt (train
   combinations, and the held-out combinations separately) over held-out sampling seeds
   (>= HELDOUT_SEED_START), DDIM 20 steps, at guidance 1 and 3, and the wall time.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.toyworld.checker import image_scores, palette_labels
from mmalign.toyworld.models import build_diffusion, diffusion_pipeline, diffusion_schedulers, shipped_size
from mmalign.toyworld.world import HELDOUT_PROMPTS, HELDOUT_SEED_START, TRAIN_PROMPTS, render, sample_scenes

ROOT = Path(__file__).resolve().parents[1]
DATA_SEED, INIT_SEED, TRAIN_SEED = 0, 0, 1


def pixels_of(scenes) -> torch.Tensor:
    """(N, 3, 16, 16) float32 in [-1, 1]."""
    arrays = np.stack([np.asarray(render(s), dtype=np.uint8) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine(step: int, total: int, warmup: int = 100) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float,
              gen: torch.Generator) -> None:
    """Reconstruction MSE + kl_weight · KL per latent element, on posterior samples. A tiny
    weight keeps the posterior nearly deterministic (std << the latents' spread)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps, 50))
    vae.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        post = vae.encode(x[idx]).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = torch.nn.functional.mse_loss(rec, x[idx]) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"vae step {step:5d}  loss {loss.item():.5f}  kl {kl.item():.3f}  {time.time() - t0:6.1f}s",
                  flush=True)
    vae.eval()


@torch.no_grad()
def vae_palette_accuracy(vae, x: torch.Tensor) -> float:
    """Share of pixels whose palette label survives encode (mean) -> decode."""
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    to_u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    a, b = to_u8(x), to_u8(rec)
    return float(np.mean([(palette_labels(p) == palette_labels(q)).mean() for p, q in zip(a, b)]))


def train_unet(parts, latents_mean, latents_std, ids, empty_ids, args, gen) -> None:
    """ε-prediction MSE; text encoder trained jointly; captions dropped with prob 0.1."""
    unet, encoder = parts["unet"], parts["text_encoder"]
    scheduler = diffusion_schedulers()[0]
    scale = parts["vae"].config.scaling_factor
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, args.steps))
    unet.train(), encoder.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(ids), (args.batch_size,), generator=gen)
        z0 = (latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)) * scale
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        tokens = torch.where(drop[:, None], empty_ids, ids[idx])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(z0, noise, t), t, encoder(tokens)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch_size / (time.time() - t0)
            print(f"unet step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s  {rate:.0f} img/s",
                  flush=True)
    unet.eval(), encoder.eval()


def save_fp16(parts, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].half()
    diffusion_pipeline(parts).save_pretrained(tmp, safe_serialization=True)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].float()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@torch.no_grad()
def evaluate(path: Path, prompts: list[str], per_prompt: int, guidance: float, steps: int = 20) -> float:
    """Checker mean over `per_prompt` held-out seeds per prompt (the folder's own pipeline and scheduler:
    DDIM for the UNet, flow-matching Euler for the flow model; `steps` steps)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    scores = []
    for prompt in prompts:
        seeds = range(HELDOUT_SEED_START, HELDOUT_SEED_START + per_prompt)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe([prompt] * per_prompt, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                      output_type="pil").images
        scores.extend(image_scores(images, [prompt] * per_prompt))
    return float(np.mean(scores))


def report_checker(path: Path, per_prompt: int) -> None:
    """Print the exact checker's mean on held-out seeds, train prompts and held-out prompt combinations,
    at guidance 1 and 3 (the numbers the shipped models' docstrings quote)."""
    for guidance in (1.0, 3.0):
        seen = evaluate(path, TRAIN_PROMPTS, per_prompt, guidance)
        held = evaluate(path, HELDOUT_PROMPTS, per_prompt, guidance)
        print(f"checker mean, held-out seeds, guidance {guidance}: train prompts {seen:.3f} "
              f"({len(TRAIN_PROMPTS)}x{per_prompt}), held-out prompt combinations {held:.3f} "
              f"({len(HELDOUT_PROMPTS)}x{per_prompt})", flush=True)


def toy_arguments(description: str, steps: int, lr: float, out: str) -> argparse.ArgumentParser:
    """The options both toy text-to-image trainers take (this script and train_toy_flow.py, which
    imports it); `steps`, `lr` and `out` (the folder under mmalign/data/toyworld/) are each one's
    defaults. Each script adds its own options after these."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--eval-per-prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "mmalign" / "data" / "toyworld" / out)
    return ap


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """(n, model_max_length) ids, padded as the pipeline pads."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def arguments() -> argparse.ArgumentParser:
    """This script's options: the shared ones (`toy_arguments`) and the VAE's."""
    ap = toy_arguments(__doc__, steps=1600, lr=1e-3, out="diffusion")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    return ap


def main() -> None:
    args = arguments().parse_args()
    torch.set_num_threads(args.threads)
    tic = time.time()
    gen = torch.Generator().manual_seed(TRAIN_SEED)

    scenes = sample_scenes(args.n_images, DATA_SEED, "train", "objects")
    x = pixels_of(scenes)
    x_test = pixels_of(sample_scenes(256, DATA_SEED, "test", "objects"))
    parts = build_diffusion(seed=INIT_SEED)
    print(f"{len(scenes)} train images; unet {sum(p.numel() for p in parts['unet'].parameters())} params, "
          f"vae {sum(p.numel() for p in parts['vae'].parameters())}, "
          f"text {sum(p.numel() for p in parts['text_encoder'].parameters())}", flush=True)

    train_vae(parts["vae"], x, args.vae_steps, args.batch_size, 2e-3, args.kl_weight, gen)
    print(f"vae palette accuracy on held-out images: {vae_palette_accuracy(parts['vae'], x_test):.4f}", flush=True)
    with torch.no_grad():
        post = parts["vae"].encode(x).latent_dist
        mean, std = post.mean.clone(), post.std.clone()
    parts["vae"].register_to_config(scaling_factor=float(1.0 / mean.std()))
    print(f"latent scaling_factor {parts['vae'].config.scaling_factor:.4f}, mean posterior std "
          f"{std.mean():.4f} (unscaled; latent means' std {mean.std():.4f})", flush=True)

    ids, empty_ids = tokenize(parts["tokenizer"], [s.caption() for s in scenes]), tokenize(parts["tokenizer"], [""])
    train_unet(parts, mean, std, ids, empty_ids, args, gen)
    train_s = time.time() - tic

    save_fp16(parts, args.out)
    print(f"saved {args.out} ({shipped_size(args.out) / 1e6:.2f} MB) after {train_s:.0f}s of training", flush=True)
    report_checker(args.out, args.eval_per_prompt)
    print(f"total wall time {time.time() - tic:.0f}s")


if __name__ == "__main__":
    main()
