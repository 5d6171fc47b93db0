"""How the cost of one DPO pair grows: text DPO with batch size and sequence length, Diffusion-DPO
with batch size and resolution. One `PreferenceTrainer` per point (frozen reference, fp32,
AdamW), `--steps` timed steps after one warm-up step, 1 torch thread; writes a PNG with the
four curves (milliseconds per pair) and the numbers as JSON.

Text: the tiny Llama of `benchmarks.text_dpo` (hidden 256, 4 layers) on pairs whose prompt is
padded with words to the target length (answers 4 words), so every sequence has that length.
Diffusion: the small SDXL-shaped model of `benchmarks.diffusion_cache`, uncached (VAE and text
encoders every step: the cost a first run pays), square images of the given side.

    python -m benchmarks.scaling              # ~4 minutes on 2 CPU cores
    python -m benchmarks.scaling --steps 5 --out benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEXT_BATCHES, TEXT_LENGTHS = (2, 4, 8, 16), (16, 32, 64, 128)  # the tiny Llama holds 128 positions
DIFFUSION_BATCHES, DIFFUSION_RESOLUTIONS = (1, 2, 4, 8), (64, 128, 192, 256)


def time_steps(cfg: Any, steps: int) -> float:
    """Median seconds of `steps` train steps after one warm-up step."""
    from mmalign.modalities import build_modality
    from mmalign.train.trainer import PreferenceTrainer

    model, likelihood, processor = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, model, likelihood, processor)
    trainer.train_step()
    durations = []
    for _ in range(steps):
        tic = time.perf_counter()
        trainer.train_step()
        durations.append(time.perf_counter() - tic)
    return statistics.median(durations)


def text_pairs(path: Path, length: int, n: int = 64) -> Path:
    """Pairs whose prompt + answer is `length` words (the word tokenizer: one token per word)."""
    import random

    from mmalign.toytext import TOY_WORDS

    rng = random.Random(length)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(TOY_WORDS) for _ in range(length - 5))
            f.write(json.dumps({"prompt": prompt, "chosen": " ".join(rng.choices(TOY_WORDS, k=4)),
                                "rejected": " ".join(rng.choices(TOY_WORDS, k=4))}) + "\n")
    return path


def text_config(work: Path, batch: int, length: int) -> Any:
    from mmalign.config import Config, from_dict

    data = text_pairs(work / f"pairs{length}.jsonl", length)
    return from_dict(Config, {
        "model": {"path": str(work / "model")}, "data": {"train": str(data), "max_length": length + 8},
        "loss": {"name": "dpo", "beta": 0.1}, "optim": {"lr": 1e-4},
        "train": {"output_dir": str(work / "run"), "batch_size": batch, "progress": False, "tensorboard": False}})


def diffusion_config(work: Path, batch: int, resolution: int) -> Any:
    from benchmarks import diffusion_cache

    s = diffusion_cache.Settings(batch_size=batch, resolution=resolution, num_pairs=16,
                                 image_size=(resolution, resolution))
    folder = work / f"diffusion{resolution}"
    if not (folder / "train.jsonl").exists():
        diffusion_cache.write_pairs(folder, s)
    cfg = diffusion_cache.make_config(work, s, cached=False, run="run")
    cfg.data.train = str(folder / "train.jsonl")
    return cfg


def measure_all(work: Path, steps: int) -> dict[str, list[dict[str, float]]]:
    from benchmarks import diffusion_cache, text_dpo

    text_dpo.prepare(work, text_dpo.Settings())
    diffusion_cache.build_pipeline(work / "pipeline", 0)
    series = {"text: batch size (64 tokens)": [], "text: sequence length (batch 8)": [],
              "diffusion: batch size (128 px)": [], "diffusion: resolution (batch 2)": []}
    points = [*((0, text_config, b, 64, b) for b in TEXT_BATCHES),
              *((1, text_config, 8, n, n) for n in TEXT_LENGTHS),
              *((2, diffusion_config, b, 128, b) for b in DIFFUSION_BATCHES),
              *((3, diffusion_config, 2, r, r) for r in DIFFUSION_RESOLUTIONS)]
    names = list(series)
    for k, make, batch, size, x in points:
        seconds = time_steps(make(work, batch, size), steps)
        series[names[k]].append({"x": x, "ms_per_pair": 1000 * seconds / batch, "ms_per_step": 1000 * seconds})
        print(f"{names[k]:34} x={x:<5} {1000 * seconds / batch:8.1f} ms/pair", flush=True)
    return series


def plot(series: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, points) in zip(axes, series.items()):
        ax.plot([p["x"] for p in points], [p["ms_per_pair"] for p in points], "o-")
        ax.set_title(name, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["x"] for p in points], [str(p["x"]) for p in points])
        ax.set_ylabel("ms per pair")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per point, after one warm-up step")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    a = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="mmalign_scaling_") as tmp:
        series = measure_all(Path(tmp), a.steps)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    png = a.out.with_suffix(".png")
    title = (f"DPO cost per pair, mmalign PreferenceTrainer, fp32, 1 CPU thread, torch {torch.__version__} "
             f"(median of {a.steps} steps per point)")
    plot(series, png, title)
    a.out.write_text(json.dumps({"title": title, "series": series}, indent=1))
    print(f"wrote {a.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
