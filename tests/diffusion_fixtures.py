"""Test data for the diffusion modalities: tiny pipelines (built in `mmalign.toydiffusion`,
saved with `save_pretrained` so tests load them through `build(cfg)`) and image pairs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from mmalign.toydiffusion import (  # noqa: F401  (re-exported for the tests)
    MAX_TOKENS, TIME_EMBED, save_tiny_pipeline, tiny_scheduler, tiny_text_config, tiny_tokenizer, tiny_unet, tiny_vae,
)


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    """A random RGB PNG with a left-right gradient (so a flip is visible)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 128, (height, width, 3)) + np.linspace(0, 127, width)[None, :, None]
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_image_pairs(root: Path, count: int, size: tuple[int, int] = (16, 16)) -> list[dict]:
    """`count` pair records with PNGs in `root/images` (paths relative to `root`)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    words = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    records = []
    for i in range(count):
        chosen = write_image(root / "images" / f"{i}_c.png", *size, seed=2 * i)
        rejected = write_image(root / "images" / f"{i}_r.png", *size, seed=2 * i + 1)
        records.append({"prompt": words[i % len(words)], "chosen": str(chosen.relative_to(root)),
                        "rejected": str(rejected.relative_to(root))})
    return records


def write_pairs_file(root: Path, count: int, **extra) -> tuple[Path, list[dict]]:
    """`count` image pairs under `root` and their jsonl `root/train.jsonl` (paths relative to
    it; `extra` fields added to every record). Returns (path, records)."""
    import json

    records = [dict(r, **extra) for r in write_image_pairs(root, count)]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def indexed_pairs(root: Path, count: int = 4) -> dict:
    """`count` pairs of distinct 16×16 PNGs: {"path": their jsonl (paths relative to its folder),
    "records": the records with `_index` set as the trainer sets it}."""
    path, records = write_pairs_file(root, count)
    return {"path": path, "records": [dict(r, _index=i) for i, r in enumerate(records)]}


class ZeroDenoiser(torch.nn.Module):
    """Predicts 0 and records its inputs by name (`first`: what the denoiser calls its first
    input: "sample" for UNets, "hidden_states" for transformers): mse is then mean(target²)."""

    def __init__(self, first: str = "sample") -> None:
        super().__init__()
        self.first, self.weight, self.seen = first, torch.nn.Parameter(torch.zeros(1)), {}

    def forward(self, *args, return_dict=True, **kwargs):
        self.seen = {**kwargs, **dict(zip((self.first, "timestep"), args))}
        return (torch.zeros_like(self.seen[self.first]),)


def perturbed(model: torch.nn.Module, scale: float = 1e-3) -> torch.nn.Module:
    """A copy of `model` with seeded noise of size `scale` added to every weight: a policy that
    differs from its reference, so cached-vs-uncached checks see a nonzero log-ratio."""
    policy = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return policy


def uncached(cfg):
    """The same config without the cache: (denoiser, likelihood owning VAE + text encoders)."""
    from mmalign.modalities import build_modality

    plain = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, cache_dir=""))
    return build_modality(plain)[:2]


def build_for(pipeline: Path, data: Path, modality: str, **diffusion):
    """(model, likelihood, processor) of a tiny pipeline folder, 16 px, no caption dropout."""
    from mmalign.config import Config, from_dict
    from mmalign.modalities import build_modality

    cfg = from_dict(Config, {"modality": modality, "model": {"path": str(pipeline)}, "data": {"train": str(data)},
                             "diffusion": dict({"resolution": 16, "caption_dropout": 0.0}, **diffusion)})
    return build_modality(cfg)


def draw_for(likelihood, records, seed=0):
    """A pair batch of `records` and its draw from a generator seeded with `seed`."""
    import torch

    batch = likelihood.collate(records, "pair")
    return batch, likelihood.draw(batch, torch.Generator().manual_seed(seed))


def write_tiny_run(root: Path, sdxl: bool = False, count: int = 32) -> Path:
    """A tiny pipeline in `root/pipeline` and `count` image pairs in `root/pairs/train.jsonl`."""
    save_tiny_pipeline(root / "pipeline", sdxl=sdxl)
    return write_pairs_file(root / "pairs", count)[0]


if __name__ == "__main__":  # python tests/diffusion_fixtures.py runs/tiny_sd [--sdxl]
    import sys

    write_tiny_run(Path(sys.argv[1]), sdxl="--sdxl" in sys.argv[2:])
    print(f"wrote {sys.argv[1]}/pipeline and {sys.argv[1]}/pairs/train.jsonl")


class Killed(Exception):
    """Stands for the kill of a caching run."""


def kill_after_first_latent_shard(monkeypatch, cache_writer, cache_dir: Path) -> None:
    """Make `cache_writer.save_atomic` die (leaving a half-written temp file, as a kill mid-write
    does) on the first write after a latent shard exists; restore it by setting the saved function back."""
    save = cache_writer.save_atomic

    def killed_after_first(tensors, path, metadata=None):
        if list(Path(cache_dir).glob("train/latents-*.safetensors")):
            path.with_name(f".{path.name}.tmp-123").write_bytes(b"half a file")
            raise Killed
        save(tensors, path, metadata)

    monkeypatch.setattr(cache_writer, "save_atomic", killed_after_first)


def dpo_and_grads(likelihood, policy, reference, batch, draw, beta: float):
    """The DPO loss of `policy` against `reference` on `draw`, and the policy's gradients."""
    from mmalign.losses import dpo_loss

    policy.zero_grad()
    with torch.no_grad():
        ref = likelihood.logps(reference, batch, draw)
    loss = dpo_loss(likelihood.logps(policy, batch, draw).pairs(), ref.pairs(), beta=beta).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def two_writers(write, timeout: float = 120) -> dict[int, dict]:
    """Run `write(rank, world_size, barrier)` as two threads standing in for two processes (a shared
    barrier, as accelerate's `wait_for_everyone`); returns each rank's stats, re-raising a failure."""
    import threading

    barrier, stats, errors = threading.Barrier(2, timeout=timeout), {}, []

    def process(rank):
        try:
            stats[rank] = write(rank, 2, barrier.wait)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return stats
