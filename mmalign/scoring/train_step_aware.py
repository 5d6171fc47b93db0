"""Train a step-aware preference model (SPO's SPM; `step_aware.py`) on human image pairs.

Per training pair (x0_w, x0_l) with prompt c and preference p (1, or 0.5 for a tie):

    t ~ U{0..t_max},  ε ~ N(0, I)               ONE t and ONE ε for both images of the pair
    x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε                   (scheduler.add_noise; x0 = VAE posterior mean, scaled)
    x̂0  = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t             ε̂ from the FROZEN UNet being aligned (CFG when
                                                   guidance > 1; v / sample predictions converted)
    loss = -(p log q_w + (1-p) log q_l),  q = softmax([s_t(c, D(x̂0_w)), s_t(c, D(x̂0_l))])

D is the VAE decoder; s_t the step-aware PickScore at t. x̂0 is computed as the SPO sampler
computes the x̂0 it scores (`StepLikelihood.predict_x0`, clipped when the scheduler config says
`clip_sample`), so the scorer is trained on the images it will be asked about. t_max defaults
to 750: SPO (20 DDIM steps) scores candidates from step ~4 on, whose timesteps are <= ~700.

Pairs: a Pick-a-Pic parquet shard / folder (`mmalign/data/pickapic.py`, ties kept as p = 0.5)
or any pair file `mmalign train` reads ({"prompt", "chosen", "rejected"[, "soft_label"]}, image
paths relative to the file). A seeded split holds out `eval_pairs` pairs; each held-out pair
(and an equally large fixed subset of training pairs) gets ONE fixed (t, ε) draw, so accuracy
before and after training is measured on the same x̂0 images.

Everything random is a function of (seed, step): the pair order (`StreamSampler`) and each
step's t and ε; a run resumed from its checkpoint (`save_every`) repeats the same steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmalign.data.preference import StreamSampler
from mmalign.errors import ConfigError, DataError
from mmalign.layout import chosen_rejected, repeat_pairs
from mmalign.scoring.step_aware import StepAwareScorer, pair_loss
from mmalign.seeds import ROW, mix_seed

ImageFn = Callable[[list[dict[str, Any]], Tensor, torch.Generator], Tensor]


# -- data ---------------------------------------------------------------------------------------
def load_pairs(path: str | Path) -> Sequence[dict[str, Any]]:
    """Pair records with "prompt", "chosen", "rejected" (images) and optional "soft_label":
    Pick-a-Pic shards (ties kept at 0.5) or a pair file of `mmalign.data.preference`."""
    from mmalign.data.pickapic import PickAPicPairs
    from mmalign.data.preference import load_preference_data

    p = Path(path)
    if p.is_dir() or any(c in str(path) for c in "*?[") or _is_pickapic_parquet(p):
        return PickAPicPairs(path, keep_ties=True)
    records, _ = load_preference_data(path, kind="pair")
    return records


def _is_pickapic_parquet(path: Path) -> bool:
    if path.suffix != ".parquet" or not path.is_file():
        return False
    import pyarrow.parquet as pq

    return {"label_0", "jpg_0", "jpg_1"} <= set(pq.ParquetFile(path).schema_arrow.names)


def pair_label(record: dict[str, Any]) -> float:
    """p = probability that "chosen" is preferred: `soft_label` when present, else 1."""
    return float(record.get("soft_label", 1.0))


def split_pairs(n: int, eval_pairs: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded permutation, the first `eval_pairs` held out."""
    if n - eval_pairs < 1:
        raise DataError(f"{n} pairs: nothing left to train on after holding out {eval_pairs}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, strides=(ROW,), offset=1, wrap=False))).tolist()
    return sorted(perm[eval_pairs:]), sorted(perm[:eval_pairs])


# -- the frozen diffusion model: x̂0 of noisy pairs ---------------------------------------------------
class NoisyX0:
    """Decoded x̂0 predictions of pair images at t under a frozen local SD / SDXL pipeline folder.

    Built on the family likelihoods (`mmalign/families/sd.py`, `sdxl.py`) for image loading, VAE and text
    encoding, and on `StepLikelihood` for CFG and x̂0, exactly as the SPO sampler uses them."""

    def __init__(self, path: str, resolution: int = 0, guidance: float = 1.0, data_path: str = "",
                 device: str | torch.device = "cpu", dtype: str = "float32") -> None:
        from mmalign.config import Config, from_dict, resolve_path
        from mmalign.families import get_family
        from mmalign.modalities.step import StepLikelihood

        folder = Path(resolve_path(path))
        if not (folder / "unet").is_dir() or not (folder / "vae").is_dir():
            raise ConfigError(f"--diffusion {path}: not a local diffusers SD/SDXL folder (needs unet/ and vae/)")
        is_xl = (folder / "text_encoder_2").is_dir()
        resolution = resolution or int(json.loads((folder / "vae" / "config.json").read_text())["sample_size"])
        cfg = from_dict(Config, {"modality": "sdxl" if is_xl else "sd", "model": {"path": str(folder), "dtype": dtype},
                                 "data": {"train": str(data_path)}, "diffusion": {"resolution": resolution},
                                 "spo": {"guidance": float(guidance)}})
        unet, base, _ = get_family(cfg.modality).build(cfg, use_cache=False)
        self.device = torch.device(device)
        self.unet = unet.requires_grad_(False).eval().to(self.device)
        self.base = base.to(self.device)
        self.step = StepLikelihood(base, cfg.spo)
        self.resolution = resolution

    @torch.no_grad()
    def latents(self, records: list[dict[str, Any]]) -> Tensor:
        """(2B, C, h, w) scaled VAE latents (posterior mean), chosen rows then rejected; images
        resized (shortest side = resolution) and centre-cropped as `mmalign train` does."""
        from mmalign.modalities.diffusion import sample_latents

        batch = self.base.collate(records, "pair")
        n = batch.inputs["pixel_values"].shape[0]
        batch.inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
        latents = self.base.latents
        pixels, _ = latents.augment(batch.inputs, torch.zeros(n, dtype=torch.bool), torch.zeros(n, 2))
        mean, std = latents.latent_dist(pixels)
        return sample_latents(mean, std, torch.zeros_like(mean), *latents.latent_scaling())

    @torch.no_grad()
    def x0_hat(self, latents: Tensor, noise: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """x̂0 (N, C, h, w) from x_t = add_noise(latents, noise, t), all (N, ...), t (N,) long."""
        noisy = self.base.scheduler.add_noise(latents, noise, timesteps)
        output = self.step.guided_output(self.unet, noisy, timesteps, cond)
        return self.step.predict_x0(output, noisy, timesteps)

    @torch.no_grad()
    def __call__(self, records: list[dict[str, Any]], timesteps: Tensor, generator: torch.Generator) -> Tensor:
        """(2B, 3, H, W) decoded x̂0 in [0, 1] of B pairs at their timesteps (B,): chosen rows then
        rejected; each pair's ε drawn from `generator` and shared by its two images."""
        from mmalign.modalities.validation import decode_latents

        latents = self.latents(records)
        b = len(records)
        noise = repeat_pairs(torch.randn((b, *latents.shape[1:]), generator=generator).to(self.device))
        t = repeat_pairs(timesteps.to(self.device))
        cond = self.step.encode(self.step.tokenize([str(r["prompt"]) for r in records]))
        cond = {k: repeat_pairs(v) for k, v in cond.items()}
        return decode_latents(self.base.vae, self.x0_hat(latents, noise, t, cond))


# -- training --------------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    steps: int = 1000
    lr: float = 3e-6  # PickScore's fine-tuning learning rate
    batch_size: int = 8
    t_max: int = 750
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_pairs: int = 64
    seed: int = 0
    save_every: int = 0  # steps between resumable checkpoints in OUT/checkpoint (0: none)
    progress: bool = True


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, step, offset=17, wrap=False))


def pair_scores(scorer: StepAwareScorer, records: list[dict[str, Any]], images: Tensor | list[Any],
                timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """Scores (B,), (B,) of the chosen and rejected images (2B rows, chosen first) at t (B,)."""
    prompts = repeat_pairs([str(r["prompt"]) for r in records])
    return chosen_rejected(scorer.scores(prompts, scorer.pixel_values(images), repeat_pairs(timesteps)))


def fixed_draw(pairs: Sequence[dict[str, Any]], indices: list[int], image_fn: ImageFn, t_max: int, seed: int,
               batch_size: int) -> list[tuple[list[dict[str, Any]], list[Any], Tensor]]:
    """Held-out batches with ONE fixed (t, ε) per pair: (records, 2B PIL images, t (B,)) each."""
    from mmalign.modalities.step_sampler import to_pil

    out = []
    for start in range(0, len(indices), batch_size):
        g = step_generator(seed, -1 - start)
        records = [pairs[i] for i in indices[start : start + batch_size]]
        t = torch.randint(0, t_max + 1, (len(records),), generator=g)
        out.append((records, to_pil(image_fn(records, t, g)), t))
    return out


@torch.no_grad()
def pairwise_accuracy(scorer: StepAwareScorer, draws: list[tuple[list[dict[str, Any]], list[Any], Tensor]]) -> float:
    """Fraction of decided pairs (p != 0.5) whose preferred image scores higher (NaN: none)."""
    was_training = scorer.model.training
    scorer.eval()
    right = total = 0
    for records, images, t in draws:
        chosen, rejected = pair_scores(scorer, records, images, t)
        labels = torch.tensor([pair_label(r) for r in records])
        decided = labels != 0.5
        right += int(((chosen > rejected) == (labels > 0.5))[decided.to(chosen.device)].sum())
        total += int(decided.sum())
    scorer.train(was_training)
    return right / total if total else float("nan")


def _save_checkpoint(folder: Path, scorer: StepAwareScorer, optimizer: torch.optim.Optimizer, step: int) -> None:
    from mmalign.io import atomic_path

    scorer.save(folder / "scorer")
    with atomic_path(folder / "optimizer.pt") as tmp:
        torch.save(optimizer.state_dict(), tmp)
    with atomic_path(folder / "state.json") as tmp:  # written last: its step says the rest is complete
        tmp.write_text(json.dumps({"step": step}))


def _load_checkpoint(folder: Path, scorer: StepAwareScorer, optimizer: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file
    from transformers import CLIPModel

    step = int(json.loads((folder / "state.json").read_text())["step"])
    saved = CLIPModel.from_pretrained(folder / "scorer", local_files_only=True, dtype=scorer.dtype)
    scorer.model.load_state_dict(saved.state_dict())
    scorer.time.load_state_dict(load_file(str(folder / "scorer" / "time_module.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=scorer.device))
    return step


def train_scorer(scorer: StepAwareScorer, pairs: Sequence[dict[str, Any]], image_fn: ImageFn, opts: TrainOptions,
                 out: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune `scorer` (CLIP + time module) on `pairs` with the PickScore objective on
    `image_fn(records, t, generator)` images ((2B, 3, H, W) in [0, 1], chosen rows first; the x̂0
    of `NoisyX0`, or anything else in tests). Returns the summary (accuracies before/after)."""
    if opts.steps < 0 or opts.batch_size < 1 or opts.t_max < 0:
        raise ConfigError("steps must be >= 0, batch_size >= 1 and t_max >= 0")
    eval_count = min(opts.eval_pairs, max(len(pairs) // 5, 1 if len(pairs) > 1 else 0))
    train_idx, eval_idx = split_pairs(len(pairs), eval_count, opts.seed)
    held_out = fixed_draw(pairs, eval_idx, image_fn, opts.t_max, opts.seed, opts.batch_size)
    train_probe = fixed_draw(pairs, train_idx[: max(eval_count, opts.batch_size)], image_fn, opts.t_max,
                             opts.seed + 1, opts.batch_size)
    summary: dict[str, Any] = {"pairs": len(pairs), "train_pairs": len(train_idx), "held_out_pairs": len(eval_idx),
                               "ties": sum(pair_label(pairs[i]) == 0.5 for i in train_idx),
                               "train_acc_before": pairwise_accuracy(scorer, train_probe),
                               "held_out_acc_before": pairwise_accuracy(scorer, held_out)}
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    stream, start = StreamSampler(len(train_idx), opts.seed), 0
    checkpoint = Path(out) / "checkpoint" if out else None
    if resume and checkpoint is not None and (checkpoint / "state.json").is_file():
        start = _load_checkpoint(checkpoint, scorer, optimizer)
        print(f"[mmalign] resuming the step-aware scorer at step {start} from {checkpoint}")
    scorer.train()
    losses: list[float] = []
    bar = tqdm(range(start, opts.steps), desc="step-aware scorer", disable=not opts.progress)
    for step in bar:
        records = [pairs[train_idx[i]] for i in stream.indices(step * opts.batch_size, opts.batch_size)]
        g = step_generator(opts.seed, step)
        t = torch.randint(0, opts.t_max + 1, (len(records),), generator=g)
        chosen, rejected = pair_scores(scorer, records, image_fn(records, t, g), t)
        loss = pair_loss(chosen, rejected, torch.tensor([pair_label(r) for r in records])).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if checkpoint is not None and opts.save_every and (step + 1) % opts.save_every == 0 and step + 1 < opts.steps:
            _save_checkpoint(checkpoint, scorer, optimizer, step + 1)
    scorer.eval()
    summary.update(steps=opts.steps, resumed_from=start, final_loss=sum(losses[-20:]) / max(len(losses[-20:]), 1),
                   train_acc=pairwise_accuracy(scorer, train_probe), held_out_acc=pairwise_accuracy(scorer, held_out))
    return summary


def summary_line(s: dict[str, Any], out: str | Path) -> str:
    return (f"step-aware scorer: {s['steps']} steps on {s['train_pairs']} train pairs ({s['ties']} ties), "
            f"{s['held_out_pairs']} held out; pairwise accuracy at random t: train {s['train_acc_before']:.3f} -> "
            f"{s['train_acc']:.3f}, held-out {s['held_out_acc_before']:.3f} -> {s['held_out_acc']:.3f}; "
            f"loss {s['final_loss']:.4f}; saved {out}")


# -- command line -----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a step-aware (SPO) preference scorer on x̂0 at random t.")
    p.add_argument("--pairs", required=True, help="Pick-a-Pic parquet shard/folder or an image-pair jsonl")
    p.add_argument("--diffusion", required=True, help="local SD / SDXL pipeline folder (frozen; predicts x̂0)")
    p.add_argument("--clip", required=True, help="local CLIP folder to start from (e.g. PickScore_v1)")
    p.add_argument("--processor", default=None, help="processor folder when --clip has none")
    p.add_argument("--out", required=True, help="output folder (spo.scorer: step_aware=OUT)")
    p.add_argument("--steps", type=int, default=TrainOptions.steps)
    p.add_argument("--lr", type=float, default=TrainOptions.lr)
    p.add_argument("--batch-size", type=int, default=TrainOptions.batch_size)
    p.add_argument("--t-max", type=int, default=TrainOptions.t_max, help="t ~ U{0..t_max}")
    p.add_argument("--weight-decay", type=float, default=TrainOptions.weight_decay)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale for x̂0 (1: off; spo.guidance to match what the SPO sampler scores)")
    p.add_argument("--resolution", type=int, default=0, help="image side for the VAE (0: the VAE's sample_size)")
    p.add_argument("--eval-pairs", type=int, default=TrainOptions.eval_pairs, help="held-out pairs (<= 20%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (resume with --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--diffusion-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        pairs = load_pairs(args.pairs)
        scorer = StepAwareScorer(args.clip, processor=args.processor, device=args.device)
        noisy = NoisyX0(args.diffusion, args.resolution, args.guidance, args.pairs, args.device, args.diffusion_dtype)
        opts = TrainOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size, t_max=args.t_max,
                            weight_decay=args.weight_decay, eval_pairs=args.eval_pairs, seed=args.seed,
                            save_every=args.save_every, progress=not args.no_progress)
        summary = train_scorer(scorer, pairs, noisy, opts, out=args.out, resume=args.resume)
        scorer.save(args.out, extra={"trained": dict(summary, **asdict(opts), guidance=args.guidance,
                                                     diffusion=str(args.diffusion), clip=str(args.clip))})
        shutil.rmtree(Path(args.out) / "checkpoint", ignore_errors=True)
    except (ConfigError, DataError) as e:
        print(f"[mmalign] error: {e}")
        return 2
    print(f"[mmalign] {summary_line(summary, args.out)}")
    return 0


if __name__ == "__main__":  # python -m mmalign.scoring.train_step_aware --pairs ... --diffusion ... --clip ... --out ...
    raise SystemExit(main())
