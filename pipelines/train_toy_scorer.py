"""Train the shipped toy CLIP scorer `mmalign/data/toyworld/scorer/` (pkg://toyworld/scorer).

Rerun from the repository root (CPU, one thread, a few minutes on a shared 2-core machine):

    OMP_NUM_THREADS=1 .venv/bin/python pipelines/train_toy_scorer.py

What it does (all seeded; the world and the models are in `mmalign/toyworld/`):
1. Renders `--n-images` 16×16 images of the ``objects`` world (split train) and degrades
   most of them the way a small diffusion model errs (blur, noise, colour bleeding, stray
   blobs, a wrong object, empty canvas); the exact checker scores every image against each of
   the 10 training prompts (`TRAIN_PROMPTS`; held-out combinations are never used).
2. Trains a transformers `CLIPModel` (`build_scorer`) so that its PickScore-style score
   `exp(logit_scale) · cos(image, text)` follows the checker: binary cross-entropy between
   sigmoid(score + b) and the checker score of every (image, prompt), plus a soft-label
   cross-entropy over the prompts (b: a training-only offset, not shipped).
3. Saves CLIPModel (fp16 safetensors) + CLIPProcessor, reloads them and prints the scorer's
   agreement with the checker: pairwise accuracy over pairs of images of the same prompt
   whose checker scores differ by > 0.1, on degraded held-out test images and on samples of
   the shipped diffusion model (held-out seeds, guidance 1) when it exists; and the wall time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mmalign.toyworld.checker import label_parts, palette_labels, parse_caption
from mmalign.toyworld.models import build_scorer, save_shipped, shipped_size
from mmalign.toyworld.world import (BACKGROUND, COLOURS, HELDOUT_SEED_START, TRAIN_PROMPTS, render,
                                    sample_scenes)

ROOT = Path(__file__).resolve().parents[1]
DATA_SEED, INIT_SEED, TRAIN_SEED = 0, 0, 1
PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float64)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One or two random corruptions of a (16, 16, 3) float image (values 0..255)."""
    for _ in range(rng.integers(1, 3)):
        kind = rng.integers(7)
        if kind == 1:  # blur: mix with the 3x3 box mean
            padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
            box = sum(padded[i:i + 16, j:j + 16] for i in range(3) for j in range(3)) / 9
            image = image + rng.uniform(0.3, 1.0) * (box - image)
        elif kind == 2:  # noise
            image = image + rng.normal(0, rng.uniform(5, 50), image.shape)
        elif kind == 3:  # colour bleeding: drawn pixels drift toward another palette colour
            drawn = np.abs(image - PALETTE[0]).sum(-1) > 30
            image[drawn] += rng.uniform(0.2, 0.8) * (PALETTE[rng.integers(1, 5)] - image[drawn])
        elif kind == 4:  # stray blob
            y, x, h, w = rng.integers(0, 14), rng.integers(0, 14), rng.integers(1, 5), rng.integers(1, 5)
            image[y:y + h, x:x + w] = PALETTE[rng.integers(1, 5)]
        elif kind == 5:  # erase part of the object
            y, x = rng.integers(0, 12), rng.integers(0, 12)
            image[y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = PALETTE[0]
        elif kind == 6 and rng.random() < 0.3:  # empty canvas
            image = np.broadcast_to(PALETTE[0], image.shape).copy()
    return np.clip(image, 0, 255)


def make_data(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 16, 16, 3) uint8 images (1/4 clean, 3/4 degraded; 1/5 show a random other object)
    and (N, 10) checker scores against TRAIN_PROMPTS."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, seed, split, "objects")
    images, targets = [], []
    asked = [parse_caption(p) for p in TRAIN_PROMPTS]
    for scene in scenes:
        image = np.asarray(render(scene), dtype=np.float64).copy()
        if rng.random() > 0.25:
            image = degrade(image, rng)
        image = image.round().astype(np.uint8)
        labels = palette_labels(image)
        images.append(image)
        targets.append([label_parts(labels, c, s)["score"] for c, s in asked])
    return np.stack(images), np.array(targets, dtype=np.float32)


def pixel_values(processor, images: np.ndarray) -> torch.Tensor:
    return processor.image_processor(list(images), return_tensors="pt").pixel_values


def text_inputs(processor) -> dict[str, torch.Tensor]:
    return dict(processor.tokenizer(TRAIN_PROMPTS, padding=True, return_tensors="pt"))


def scores(model, pixels: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, 10) exp(logit_scale) · cos(image, prompt)."""
    out = model(pixel_values=pixels.to(model.dtype), **text)
    return out.logits_per_image.float()


def pairwise_accuracy(pred: np.ndarray, truth: np.ndarray, margin: float = 0.1) -> tuple[float, int]:
    """Share of same-prompt image pairs with |Δ checker| > margin ordered alike by `pred`.
    pred, truth: (N, P); compares images i < j within each prompt column."""
    agree = total = 0
    for p in range(truth.shape[1]):
        dt = truth[:, None, p] - truth[None, :, p]
        dp = pred[:, None, p] - pred[None, :, p]
        keep = np.triu(np.abs(dt) > margin, 1)
        agree += int((np.sign(dt) == np.sign(dp))[keep].sum())
        total += int(keep.sum())
    return agree / max(total, 1), total


def train(model, pixels, targets, text, args) -> None:
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    bias = torch.nn.Parameter(torch.tensor(-5.0))
    opt = torch.optim.AdamW(list(model.parameters()) + [bias], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 1 - s / args.steps))
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(pixels), (args.batch_size,), generator=gen)
        logits, target = scores(model, pixels[idx], text), targets[idx]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits + bias, target)
        has = target.sum(-1) > 0
        soft = target[has] / target[has].sum(-1, keepdim=True)
        ce = -(soft * logits[has].log_softmax(-1)).sum(-1).mean() if bool(has.any()) else logits.sum() * 0
        loss = bce + 0.5 * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f} (bce {bce.item():.4f}, ce {ce.item():.4f})  "
                  f"{time.time() - t0:6.1f}s", flush=True)
    model.eval()


@torch.no_grad()
def diffusion_samples(path: Path, per_prompt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples of the diffusion model (held-out seeds, DDIM 20, guidance 1): images (N, 16, 16, 3),
    the index of their prompt in TRAIN_PROMPTS (N,) and their checker score (N,)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images, prompt_index, truth = [], [], []
    for p, prompt in enumerate(TRAIN_PROMPTS):
        gens = [torch.Generator().manual_seed(HELDOUT_SEED_START + s) for s in range(per_prompt)]
        out = pipe([prompt] * per_prompt, generator=gens, num_inference_steps=20, guidance_scale=1.0,
                   output_type="np").images
        for im in (out * 255).round().astype(np.uint8):
            images.append(im)
            prompt_index.append(p)
            truth.append(label_parts(palette_labels(im), *parse_caption(prompt))["score"])
    return np.stack(images), np.array(prompt_index), np.array(truth)


def grouped_accuracy(pred: np.ndarray, prompt_index: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    """`pairwise_accuracy` within each prompt's own samples (pred (N, P), truth (N,))."""
    agree = total = 0
    for p in np.unique(prompt_index):
        rows = prompt_index == p
        acc, n = pairwise_accuracy(pred[rows][:, [p]], truth[rows][:, None])
        agree, total = agree + acc * n, total + n
    return agree / max(total, 1), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--diffusion", type=Path, default=ROOT / "mmalign" / "data" / "toyworld" / "diffusion")
    ap.add_argument("--out", type=Path, default=ROOT / "mmalign" / "data" / "toyworld" / "scorer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tic = time.time()
    model, processor = build_scorer(seed=INIT_SEED)
    images, targets = make_data(args.n_images, DATA_SEED, "train")
    pixels, text = pixel_values(processor, images), text_inputs(processor)
    print(f"scorer {sum(p.numel() for p in model.parameters())} params; {len(images)} images, mean checker "
          f"score of the own caption {targets.max(-1).mean():.3f}", flush=True)
    train(model, pixels, torch.from_numpy(targets), text, args)
    train_s = time.time() - tic

    save_shipped(model.eval(), processor, args.out)
    print(f"saved {args.out} ({shipped_size(args.out) / 1e6:.2f} MB) after {train_s:.0f}s", flush=True)

    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(args.out, dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(args.out)
    text = text_inputs(processor)
    with torch.no_grad():
        test_images, test_targets = make_data(1000, DATA_SEED, "test")
        pred = scores(model, pixel_values(processor, test_images), text).numpy()
        acc, n = pairwise_accuracy(pred, test_targets)
        print(f"held-out degraded test images: pairwise accuracy vs checker {acc:.3f} ({n} pairs); "
              f"best prompt = checker's best {np.mean(pred.argmax(-1) == test_targets.argmax(-1)):.3f}", flush=True)
        if (args.diffusion / "model_index.json").exists():
            samples, prompt_index, truth = diffusion_samples(args.diffusion, 16)
            pred = scores(model, pixel_values(processor, samples), text).numpy()
            acc, n = grouped_accuracy(pred, prompt_index, truth)
            print(f"diffusion samples (held-out seeds, guidance 1): pairwise accuracy vs checker {acc:.3f} "
                  f"({n} same-prompt pairs)", flush=True)
    print(f"total wall time {time.time() - tic:.0f}s")


if __name__ == "__main__":
    main()
