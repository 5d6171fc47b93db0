"""Real shapes without weights (issue 17, item 5): each current family's PUBLISHED transformer config
(configs/<family>/*.json, copied from the hub config.json with its `_source`: widths, heads, RoPE
axes, in/out channels, text width) instantiated with random bf16 weights at reduced depth, next to
a text encoder of the published hidden width, runs on CPU through the family's own code:

- the folder is written with `save_pretrained` and loaded by the family's `build(cfg)` from its
  shipped recipe (configs/<family>/flow_dpo_lora*.yaml: its LoRA targets, loss, beta), model.dtype
  bfloat16;
- one LoRA Flow-DPO step on one pair, under the recipe's mixed precision (bf16 autocast) as the
  trainer runs it: the reference (adapters off) and the policy score the same draw, dpo loss
  (= log 2: LoRA B starts at 0), backward, AdamW; then the policy is scored again (the loss moved:
  gradients reached the adapters through every real-width layer);
- sampling through the family's pipeline (`validation.sampling_pipeline`, guidance 1): 2 inference
  steps (Qwen-Image's shift_terminal stretch divides by zero at 1 step), decoding an image / a video
  of the run's resolution.

Reductions (the same in CI and `make bench`; everything else is the published value):
- depth: 1 double- + 1 single-stream block (FLUX.2 [klein]), 1 double-stream block and no
  single-stream one (FLUX.2 [dev]: 2.3 B parameters with one, whose 512-token run peaked at 6.4 GiB;
  klein runs the single-stream code), 1 block (Qwen-Image, Wan), 1 main + 1 refiner layer each
  (Z-Image);
- text encoders keep the published hidden width (the transformer's text input width): FLUX.2 klein
  Qwen3 (2560) and dev Mistral3 (5120) keep the depth the pipeline reads (layers 9/18/27, 10/20/30:
  27 and 30 layers) with 2 heads of the published head_dim 128, 1 KV head and MLP 256 wide;
  Qwen-Image's Qwen2.5-VL (3584, 1 layer, published heads / KV heads / MLP / mrope, a 1-block
  vision tower), Z-Image's Qwen3 (2560, 2 layers: the pipeline reads hidden_states[-2], published
  heads / MLP), Wan's UMT5 (4096, 1 layer, published heads / d_kv / d_ff); vocabularies are the
  word-level test tokenizers';
- VAEs: the tests' tiny VAEs with the published LATENT channels (FLUX.2 32 -> 128 patchified,
  Qwen-Image / Z-Image / Wan 2.1 16, Wan 2.2 TI2V 48 with its patch 2 and residual blocks);
- the text length: `--text-length` (the pipelines' max_sequence_length, published 512) for the
  padded-prompt families (FLUX.2, Wan; Qwen-Image and Z-Image use the prompt's own tokens);
- size: `--tokens` latent tokens per image side; Wan videos are 5 frames, twice as wide as high
  (`diffusion.width`, as Wan's 832 x 480).

`python -m benchmarks.real_shapes` (make bench) runs every family, each in its own process (its own
peak RSS), at `--tokens 8` latent tokens per side and `--text-length 512`, and writes
benchmarks/results/real_shapes.json; tests/test_real_shapes.py runs it at the smallest size.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import real_shape_parts as parts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "real_shapes.json"
MAX_RSS_GB = 6.0


def records_for(shape: parts.Shape, root: Path, resolution: int) -> Path:
    """One pair file for the run: two image pairs of `resolution` px (written under `root`), or the
    shipped video pairs (datasets/video_pairs)."""
    if shape.video:
        return parts.VIDEO_PAIRS
    from diffusion_fixtures import write_pairs_file

    path, _ = write_pairs_file(root / "pairs", 2)
    return path


def load(shape: parts.Shape, folder: Path, data: Path, resolution: int, frames: int) -> Any:
    """The family's recipe config pointed at `folder` / `data`, bf16 weights (its gradient
    checkpointing kept: FLUX.2 [dev] at 512 text tokens needs it to stay under 6 GB)."""
    from mmalign.config import load_config

    overrides = [f"model.path={folder}", f"data.train={data}", "data.format=auto", "model.dtype=bfloat16",
                 f"diffusion.resolution={resolution}",
                 "diffusion.random_flip=false", "diffusion.caption_dropout=0.0", "train.progress=false"]
    if shape.video:  # non-square, as Wan's 832 x 480: twice as wide as high
        overrides += [f"diffusion.num_frames={frames}", "diffusion.vae_batch_size=0",
                      f"diffusion.width={2 * resolution}"]
    return load_config(ROOT / shape.recipe, overrides)


def dpo_step(cfg: Any, model: torch.nn.Module, likelihood: Any, records: list[dict]) -> dict[str, Any]:
    """One LoRA Flow-DPO step on `records` (module docstring); the losses before and after, and the
    conditioning width the transformer read."""
    from mmalign.losses import dpo_loss

    batch = likelihood.collate(records, "pair")
    draw = likelihood.draw(batch, torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    with torch.no_grad(), model.disable_adapter(), autocast:  # as the trainer: the recipe's mixed precision
        reference = likelihood.logps(model, batch, draw)
    with autocast:
        policy = likelihood.logps(model, batch, draw)
    loss = dpo_loss(policy.pairs(), reference.pairs(), beta=cfg.loss.beta).mean()
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in trained if p.grad is not None))
    torch.optim.AdamW(trained, lr=1e-3).step()
    with torch.no_grad(), autocast:
        after = dpo_loss(likelihood.logps(model, batch, draw).pairs(), reference.pairs(), beta=cfg.loss.beta).mean()
    widths = {k: int(v.shape[-1]) for k, v in draw.values.items() if k in parts.TEXT_KEYS}
    return {"loss": loss.item(), "loss_after": after.item(), "grad_norm": grad_norm.item(),
            "trained_params": sum(p.numel() for p in trained), "text_width": widths}


def sampling_step(likelihood: Any, model: torch.nn.Module, resolution: int, frames: int,
                  text_length: int) -> list[int]:
    """Two inference steps of the family's pipeline (guidance 1, no CFG): the decoded output's shape."""
    from mmalign.modalities.validation import guidance_arguments, sampling_pipeline

    pipe = sampling_pipeline(likelihood, model)
    extra = {"num_frames": frames, "output_type": "np"} if likelihood.family.sample == "videos" else {
        "output_type": "pt"}
    width = likelihood.settings.width or resolution
    with torch.no_grad():
        out = pipe(prompt=["a red circle"], num_inference_steps=2, height=resolution, width=width,
                   max_sequence_length=text_length, generator=torch.Generator().manual_seed(0),
                   **guidance_arguments(likelihood.family, 1.0), **extra)
    sample = torch.as_tensor(out.frames if "num_frames" in extra else out.images)
    if not bool(torch.isfinite(sample).all()):
        raise RuntimeError("the sampling step decoded non-finite values")
    return list(sample.shape)


def write_family(name: str, work: Path) -> dict[str, Any]:
    """Write the real-shape folder of family `name` into work/pipeline (its own process: the random
    transformer is freed before the run loads it)."""
    tic = time.perf_counter()
    parts.write_folder(parts.SHAPES[name], work / "pipeline")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": time.perf_counter() - tic, "peak_rss_gb": peak}


def run_family(name: str, tokens: int, text_length: int, work: Path) -> dict[str, Any]:
    """Load family `name`'s folder (`write_family`) through its recipe, then the DPO step and the
    sampling step."""
    from mmalign.data.preference import load_split
    from mmalign.modalities import build_modality
    from mmalign.train.setup import apply_lora

    shape = parts.SHAPES[name]
    resolution, frames = shape.unit * tokens, 5
    tic = time.perf_counter()
    folder = work / "pipeline"
    data = records_for(shape, work, resolution)
    cfg = load(shape, folder, data, resolution, frames)
    model, likelihood, _ = build_modality(cfg)
    likelihood.conditioning.encoder.max_sequence_length = text_length  # the pipelines' max_sequence_length
    model = apply_lora(model, cfg)
    split, _ = load_split(cfg.data.train, format=cfg.data.format)
    records = [dict(split[0], _index=0)]
    built = time.perf_counter()
    step = dpo_step(cfg, model, likelihood, records)
    stepped = time.perf_counter()
    sample = sampling_step(likelihood, model, resolution, frames, text_length)
    return {"family": name, "modality": shape.modality, "published": shape.transformer,
            "transformer_params": sum(p.numel() for p in model.get_base_model().parameters()),
            "resolution": resolution, "text_length": text_length, **step, "sample_shape": sample,
            "seconds": {"build": built - tic, "dpo_step": stepped - built, "sample": time.perf_counter() - stepped},
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def child(argv: list[str]) -> None:
    """`--child write NAME WORK OUT` or `--child run NAME WORK OUT TOKENS TEXT_LENGTH`: one phase of
    one family, its JSON to OUT."""
    phase, name, work, out, *sizes = argv
    torch.manual_seed(0)
    if phase == "write":
        row = write_family(name, Path(work))
    else:
        row = run_family(name, int(sizes[0]), int(sizes[1]), Path(work))
    Path(out).write_text(json.dumps(row))


def in_process(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`python -m benchmarks.real_shapes --child ARGS` in a fresh process; the JSON it wrote."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.real_shapes", "--child", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"real shapes: {' '.join(args[:2])} failed:\n{done.stderr[-4000:]}")
    return json.loads(Path(args[3]).read_text())


def run_all(names: list[str], tokens: int, text_length: int, work: Path, threads: int) -> list[dict[str, Any]]:
    """Each family in two fresh processes (write the folder, then run); its JSON row."""
    import os

    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    for name in names:
        written = in_process(["write", name, str(work / name), str(work / f"{name}.write.json")], env)
        row = in_process(["run", name, str(work / name), str(work / f"{name}.json"), str(tokens), str(text_length)],
                         env)
        row["seconds"]["write"], row["write_peak_rss_gb"] = written["seconds"], written["peak_rss_gb"]
        rows.append(row)
        shutil.rmtree(work / name / "pipeline")  # gigabytes of random weights
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| family | transformer params (reduced) | text width | loss -> after | write s | load s | step s | "
            "sample s | peak RSS GiB (write, run) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['family']} | {r['transformer_params'] / 1e6:.0f} M | {list(r['text_width'].values())} | "
                     f"{r['loss']:.4f} -> {r['loss_after']:.4f} | {s['write']:.0f} | {s['build']:.0f} | "
                     f"{s['dpo_step']:.0f} | {s['sample']:.0f} | "
                     f"{r['write_peak_rss_gb']:.2f}, {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return []
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(parts.SHAPES), help="comma-separated families (default: all)")
    p.add_argument("--tokens", type=int, default=8, help="latent tokens per image side (default %(default)s)")
    p.add_argument("--text-length", type=int, default=512, help="max_sequence_length (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per family (default %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON to write (default %(default)s)")
    a = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = run_all(a.only.split(","), a.tokens, a.text_length, a.work or Path(tmp), a.threads)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"tokens": a.tokens, "text_length": a.text_length, "rows": rows}, indent=2))
    print(table(rows))
    bad = [r["family"] for r in rows if max(r["peak_rss_gb"], r["write_peak_rss_gb"]) > MAX_RSS_GB
           or not math.isfinite(r["loss_after"])]
    if bad:
        raise SystemExit(f"real shapes: over {MAX_RSS_GB} GB or non-finite: {bad}")
    return rows


if __name__ == "__main__":
    main()
