"""Train the shipped toy flow-matching text-to-image model `mmalign/data/toyworld/flow/` (pkg://toyworld/flow).

Rerun from the repository root (CPU, one thread):

    OMP_NUM_THREADS=1 .venv/bin/python pipelines/train_toy_flow.py

An SD3-shaped model (family ``sd3``, `StableDiffusion3Pipeline`) for the toy world's 16×16 ``objects``:

- VAE: the trained one-block AutoencoderKL of pkg://toyworld/diffusion, reused as is (3×16×16 <-> 4×16×16,
  its scaling_factor) with ``shift_factor = 0`` (the SD3 pipeline and family read it).
- Text: CLIP-L-like and CLIP-G-like `CLIPTextModelWithProjection` (2 layers, hidden 32, projection 16 each,
  the character-level tokenizer); the L encoder starts from pkg://toyworld/diffusion's trained text
  encoder, the G encoder from scratch; a 1-layer `T5EncoderModel` (d_model 64) on the same characters
  padded to 256 tokens (the pipeline's max_sequence_length); all three train jointly:
  encoder_hidden_states = cat(L hidden[-2], G hidden[-2]) (n, 24, 64) ++ T5 last hidden (n, 256, 64),
  pooled = cat(L, G text_embeds) (n, 32). (With all three encoders in the folder,
  `StableDiffusion3Pipeline.from_pretrained` loads it with no extra arguments.)
- Transformer: `SD3Transformer2DModel` (patch 2 on 4×16×16 latents -> 64 tokens, `--layers` joint blocks,
  `--heads`×16 wide).
- Scheduler: `FlowMatchEulerDiscreteScheduler(shift=1.0)` (16×16 images need no resolution shift).

Rectified-flow training (SD3, Esser et al. 2403.03206 eq. 1-3): z0 = vae latent · scaling_factor,
σ = sigmoid(n), n ~ N(0, 1) (logit-normal), z_σ = (1 - σ) z0 + σ ε,
loss = ‖v_θ(z_σ, 1000σ, c) - (ε - z0)‖²,
10 % of captions dropped to "" (classifier-free guidance), AdamW, warm-up + cosine decay.
Saves the pipeline in fp16 safetensors, reloads it in float32 and prints the exact checker's mean over
held-out sampling seeds (>= HELDOUT_SEED_START), Euler 20 steps, guidance 1 and 3 (`report_checker` of
train_toy_diffusion.py), and the wall time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
from train_toy_diffusion import cosine, pixels_of, report_checker, tokenize, toy_arguments  # noqa: E402

from mmalign.config import resolve_path  # noqa: E402
from mmalign.toyworld.models import DIFFUSION_PATH, char_tokenizer, shipped_size, text_config  # noqa: E402
from mmalign.toyworld.world import sample_scenes  # noqa: E402

DATA_SEED, INIT_SEED, TRAIN_SEED = 0, 0, 1
ENCODED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")  # the trained parts
T5_TOKENS = 256  # the pipeline's default max_sequence_length
TEXT_WIDTH = 64  # CLIP-L 32 + CLIP-G 32 hidden = joint_attention_dim


def build_flow(layers: int, heads: int, seed: int = INIT_SEED) -> dict[str, Any]:
    """The pipeline's parts: transformer, both text encoders (L from the toy UNet's), the shipped VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    source = resolve_path(DIFFUSION_PATH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=16,
            num_attention_heads=heads, joint_attention_dim=TEXT_WIDTH, caption_projection_dim=16 * heads,
            pooled_projection_dim=32, pos_embed_max_size=8)
        clip_l = CLIPTextModelWithProjection(text_config(32, projection=16))
        clip_g = CLIPTextModelWithProjection(text_config(32, projection=16))
        t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=TEXT_WIDTH, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                     pad_token_id=1, eos_token_id=1, decoder_start_token_id=0))
    trained = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32)
    clip_l.text_model.load_state_dict(trained.state_dict())  # strict: same shapes; projection new
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return {"transformer": transformer, "text_encoder": clip_l, "text_encoder_2": clip_g, "text_encoder_3": t5,
            "vae": vae.eval(), "tokenizer": char_tokenizer(), "tokenizer_2": char_tokenizer(),
            "tokenizer_3": char_tokenizer(T5_TOKENS),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0)}


def encode_text(parts: dict[str, Any], ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states (n, 24 + 256, 64), pooled (n, 32)) as StableDiffusion3Pipeline.encode_prompt."""
    hidden, pooled = [], []
    for name in ("text_encoder", "text_encoder_2"):
        out = parts[name](ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    return torch.cat([clip, parts["text_encoder_3"](t5_ids)[0]], dim=-2), torch.cat(pooled, dim=-1)


def train_flow(parts: dict[str, Any], z0_all: torch.Tensor, ids: tuple[torch.Tensor, torch.Tensor],
               empty_ids: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace, gen: torch.Generator) -> None:
    """Rectified-flow velocity MSE (module docstring); text encoders trained jointly."""
    model = parts["transformer"]
    params = [p for n in ENCODED for p in parts[n].parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, args.steps))
    for n in ENCODED:
        parts[n].train()
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(z0_all), (args.batch_size,), generator=gen)
        z0 = z0_all[idx]
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        tokens = [torch.where(drop[:, None], empty, full[idx]) for full, empty in zip(ids, empty_ids)]
        hidden, pooled = encode_text(parts, *tokens)
        noise = torch.randn(z0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(args.batch_size, generator=gen))
        s = sigma[:, None, None, None]
        pred = model(hidden_states=(1 - s) * z0 + s * noise, encoder_hidden_states=hidden,
                     pooled_projections=pooled, timestep=sigma * 1000, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch_size / (time.time() - t0)
            print(f"flow step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s  {rate:.0f} img/s",
                  flush=True)
    for n in ENCODED:
        parts[n].eval()


def save_fp16(parts: dict[str, Any], out: Path) -> None:
    """The StableDiffusion3Pipeline (no T5) in fp16 safetensors, through a temporary sibling folder."""
    from diffusers import StableDiffusion3Pipeline

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusion3Pipeline(**parts, image_encoder=None, feature_extractor=None)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def arguments() -> argparse.ArgumentParser:
    """This script's options: the shared ones (train_toy_diffusion's `toy_arguments`) and the transformer's."""
    ap = toy_arguments(__doc__, steps=700, lr=2e-3, out="flow")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=3)
    return ap


def main() -> None:
    args = arguments().parse_args()
    torch.set_num_threads(args.threads)
    tic = time.time()
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    scenes = sample_scenes(args.n_images, DATA_SEED, "train", "objects")
    parts = build_flow(args.layers, args.heads)
    with torch.no_grad():
        vae = parts["vae"]
        z0 = torch.cat([vae.encode(x).latent_dist.mean for x in pixels_of(scenes).split(1000)])
        z0 = z0 * vae.config.scaling_factor
    count = lambda n: sum(p.numel() for p in parts[n].parameters())  # noqa: E731
    text = sum(count(n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    print(f"{len(scenes)} train images; transformer {count('transformer')} params, text {text}, vae {count('vae')}; "
          f"latent std {z0.std():.3f}", flush=True)
    captions = [s.caption() for s in scenes]
    ids = tuple(tokenize(parts[name], captions) for name in ("tokenizer", "tokenizer_3"))
    empty = tuple(tokenize(parts[name], [""]) for name in ("tokenizer", "tokenizer_3"))
    train_flow(parts, z0, ids, empty, args, gen)
    train_s = time.time() - tic
    save_fp16(parts, args.out)
    print(f"saved {args.out} ({shipped_size(args.out) / 1e6:.2f} MB) after {train_s:.0f}s of training", flush=True)
    report_checker(args.out, args.eval_per_prompt)
    print(f"total wall time {time.time() - tic:.0f}s")


if __name__ == "__main__":
    main()
