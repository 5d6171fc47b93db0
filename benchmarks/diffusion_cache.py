"""Diffusion-DPO training throughput, cached vs uncached latents, on a small SDXL-shaped model.

Both sides run `PreferenceTrainer.train_step()` on the SAME UNet (loaded from one
`save_pretrained` folder), the same pairs in the same order, the same step seeds (so the same
t, ε, flips, dropped captions and VAE-posterior samples), the same batch and optimizer: the
math is equal. Uncached, every step decodes the PNGs, resizes and crops them, runs the VAE
encoder and both text encoders; cached (`mmalign cache` first: `write_cache`), every step
reads the posterior mean/std (+ flips) and the text tensors from safetensors shards. The
first losses of the two sides must agree within `--loss-tol` (fp16 storage rounding),
otherwise the comparison is void (exit status 1).

The model is SDXL's architecture scaled down for a CPU: VAE with SDXL's 4 blocks (factor 8)
and channels (32, 64, 128, 128); UNet with SDXL's 3 levels (DownBlock2D, 2 x CrossAttn),
channels (32, 64, 128), transformer depth (1, 2), 2 resnets per level; two CLIP text
encoders (4 layers, widths 64 and 128, 77 tokens: prompt width 192, pooled 64); 128 x 128
training crops (latents 4 x 16 x 16) from 176 x 144 PNGs.

    python -m benchmarks.diffusion_cache            # ~3 minutes on 2 CPU cores
    python -m benchmarks.diffusion_cache --steps 20 --repeats 3 --out /tmp/diffusion_cache.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import string
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import measure

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Settings:
    steps: int = 14
    warmup: int = 2
    repeats: int = 2  # runs per side, alternating (uncached, cached, cached, uncached, ...)
    batch_size: int = 4  # pairs per step
    num_pairs: int = 64
    resolution: int = 128
    image_size: tuple[int, int] = (176, 144)  # (w, h) of the PNGs: resized to 157 x 128, centre-cropped
    cache_dtype: str = "float16"
    threads: int = 1
    seed: int = 0
    loss_tol: float = 2e-2


def build_pipeline(path: Path, seed: int) -> None:
    """Save the small SDXL-shaped pipeline (random weights) with `save_pretrained`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    text = lambda hidden, proj: CLIPTextConfig(  # noqa: E731
        vocab_size=128, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=proj, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(text(64, 64)).save_pretrained(path / "text_encoder")
    CLIPTextModelWithProjection(text(128, 64)).save_pretrained(path / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(path / name)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4, norm_num_groups=16,
                  sample_size=128, scaling_factor=0.13025).save_pretrained(path / "vae")
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64 + 128, attention_head_dim=(2, 4, 8),
        norm_num_groups=16, addition_embed_type="text_time", addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=6 * 16 + 64, use_linear_projection=True,
    ).save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear").save_pretrained(path / "scheduler")


def write_pairs(root: Path, s: Settings) -> Path:
    """`num_pairs` pairs of random PNGs; 16 distinct captions (so the text table dedups 4x)."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(s.seed)
    lines = []
    for i in range(s.num_pairs):
        names = []
        for side in ("c", "r"):
            w, h = s.image_size
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}{side}.png")
            names.append(f"images/{i}{side}.png")
        lines.append(json.dumps({"prompt": f"a photo of thing number {i % 16} on a table", "chosen": names[0],
                                 "rejected": names[1]}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def make_config(work: Path, s: Settings, cached: bool, run: str) -> Any:
    from mmalign.config import Config, from_dict

    return from_dict(Config, {
        "modality": "sdxl", "model": {"path": str(work / "pipeline")}, "data": {"train": str(work / "train.jsonl")},
        "diffusion": {"resolution": s.resolution, "random_flip": True, "caption_dropout": 0.2,
                      "cache_dir": str(work / "cache") if cached else "", "cache_dtype": s.cache_dtype},
        "loss": {"name": "dpo", "beta": 5000.0}, "optim": {"name": "adamw", "lr": 1e-5},
        "train": {"output_dir": str(work / run), "max_steps": s.steps, "batch_size": s.batch_size,
                  "seed": s.seed, "progress": False, "tensorboard": False}})


def data_path_calls(likelihood: Any) -> list[tuple[Any, str, str]]:
    """(object, method, key) of the data path that caching replaces: collate reads images or cache
    rows; the VAE (`encode_images`) and the text encoders (`encode_prompt`) of an uncached run."""
    from mmalign.modalities.diffusion import ImageLatents
    from mmalign.modalities.text import TextConditioning

    calls = [(likelihood, "collate", "collate")]
    if isinstance(likelihood.latents, ImageLatents):
        calls.append((likelihood.latents, "latent_dist", "encode_images"))
    if isinstance(likelihood.conditioning, TextConditioning):
        calls.append((likelihood.conditioning.encoder, "encode", "encode_prompt"))
    return calls


def time_calls(calls: list[tuple[Any, str, str]]) -> dict[str, float]:
    """Wrap each (object, method, key) to add its wall time to the returned dict under key; the
    keys collate, encode_images and encode_prompt are always there (0 when not called)."""
    spent = dict.fromkeys(("collate", "encode_images", "encode_prompt"), 0.0)
    for owner, method_name, name in calls:
        method = getattr(owner, method_name)

        def timed(*args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
            tic = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - tic

        setattr(owner, method_name, timed)
    return spent


def run_side(work: Path, s: Settings, cached: bool, repeat: int) -> dict[str, Any]:
    """Build the modality and the trainer, then time `steps` train steps."""
    from mmalign.modalities import build_modality
    from mmalign.train.trainer import PreferenceTrainer

    tic = time.perf_counter()
    cfg = make_config(work, s, cached, f"run_{'cached' if cached else 'uncached'}_{repeat}")
    unet, likelihood, _ = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, unet, likelihood)
    setup = time.perf_counter() - tic
    spent = time_calls(data_path_calls(likelihood))
    start, ends, losses = time.perf_counter(), [], []
    for _ in range(s.steps):
        losses.append(float(trainer.train_step()["loss"]))
        ends.append(time.perf_counter())
    durations = measure.step_durations(ends, start)[s.warmup:]
    encoding = sum(spent.values()) / (ends[-1] - start)  # share of all steps' time (warm-up included)
    return {"encoding_share": encoding, "seconds_in": spent, "side": "cached" if cached else "uncached", "setup_s": setup, "losses": losses,
            "pairs_per_s": measure.steady_rate(ends, start, s.warmup, s.batch_size),
            "step_ms_median": 1000 * statistics.median(durations), "step_s": durations,
            "loaded_vae": likelihood.vae is not None}


def build_cache(work: Path, s: Settings) -> dict[str, Any]:
    """`mmalign cache`'s work, timed: encode every pair once (VAE + flips, unique captions)."""
    from mmalign.families.sdxl import build
    from mmalign.modalities.cache_writer import write_cache

    cfg = make_config(work, s, True, "cache")
    tic = time.perf_counter()
    _, likelihood, _ = build(cfg, use_cache=False, trained=False)
    stats = write_cache(cfg, likelihood)
    seconds = time.perf_counter() - tic
    size = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
    return {"seconds": seconds, "mib": size / 2**20, "captions": stats["captions"], "shards_written": stats["written"]}


def summarise(runs: list[dict[str, Any]], s: Settings, cache: dict[str, Any]) -> dict[str, Any]:
    by = {side: [r for r in runs if r["side"] == side] for side in ("uncached", "cached")}
    keys = ("pairs_per_s", "step_ms_median", "setup_s", "encoding_share")
    med = {side: {k: statistics.median(r[k] for r in rs) for k in keys}
           for side, rs in by.items()}
    spread = {side: measure.spread([r["pairs_per_s"] for r in rs]) for side, rs in by.items()}
    diff = max(abs(a - b) for u in by["uncached"] for c in by["cached"] for a, b in zip(u["losses"], c["losses"]))
    return {"median": med, "spread": spread, "speedup": med["cached"]["pairs_per_s"] / med["uncached"]["pairs_per_s"],
            "max_loss_diff": diff, "losses_agree": diff <= s.loss_tol, "cache": cache}


def table(summary: dict[str, Any], s: Settings) -> str:
    m, sp = summary["median"], summary["spread"]
    rows = [f"Diffusion-DPO, small SDXL-shaped model ({s.resolution}px crops, batch {s.batch_size} pairs, "
            f"{s.steps} steps ({s.warmup} warm-up), frozen reference, fp32, {s.threads} thread(s)), "
            f"median of {s.repeats} alternating runs per side; cache dtype {s.cache_dtype}",
            f"{'metric':38}{'uncached':>16}{'cached':>16}{'cached/uncached':>17}"]
    for label, key in (("throughput, pairs/s (after warm-up)", "pairs_per_s"), ("step time, ms (median step)",
                                                                                 "step_ms_median"),
                       ("setup, s (load models, build trainer)", "setup_s"),
                       ("share of step time in collate+encoders", "encoding_share")):
        u, c = m["uncached"][key], m["cached"][key]
        note = lambda side: f" (±{50 * sp[side]:.0f}%)" if key == "pairs_per_s" else ""  # noqa: E731
        rows.append(f"{label:38}{f'{u:.3g}' + note('uncached'):>16}{f'{c:.3g}' + note('cached'):>16}{c / u:>17.2f}")
    cache = summary["cache"]
    rows.append(f"{'one-off mmalign cache, s / MiB':38}{'':>16}{cache['seconds']:>9.1f} / {cache['mib']:.1f}")
    agree = "agree" if summary["losses_agree"] else "DISAGREE"
    rows.append(f"{'losses, max |cached - uncached|':38}{summary['max_loss_diff']:>32.1e}  {agree} (tol {s.loss_tol})")
    return "\n".join(rows)


def parse_settings(cls: type, argv: list[str] | None, doc: str, out: str) -> tuple[Any, Path]:
    """A `--field value` option per Settings field (not image_size) and `--out`; sets the thread
    count (OMP and torch) before the benchmark imports anything heavy."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    for f in dataclasses.fields(cls):
        if f.name != "image_size":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out))
    args = p.parse_args(argv)
    s = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "image_size"})
    os.environ["OMP_NUM_THREADS"] = str(s.threads)
    import torch
    from transformers.utils import logging

    torch.set_num_threads(s.threads)
    logging.disable_progress_bar()
    return s, Path(args.out)


def main(argv: list[str] | None = None) -> int:
    s, out = parse_settings(Settings, argv, __doc__, "diffusion_cache.json")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_pipeline(work / "pipeline", s.seed)
        write_pairs(work, s)
        cache = build_cache(work, s)
        order = [[False, True], [True, False]]
        runs = [run_side(work, s, cached, r) for r in range(s.repeats) for cached in order[r % 2]]
    summary = summarise(runs, s, cache)
    print(table(summary, s))
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    out.write_text(json.dumps({"settings": dataclasses.asdict(s), "versions": versions, "summary": summary,
                               "runs": runs, "loadavg_after": os.getloadavg()}, indent=1))
    print(f"wrote {out}")
    return 0 if summary["losses_agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
