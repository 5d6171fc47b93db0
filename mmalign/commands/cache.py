"""`mmalign cache CONFIG [section.key=value ...]`: encode the diffusion data once into
`diffusion.cache_dir` (VAE latent distributions with flips, deduplicated text embeddings, for the
UNet and the flow families alike; for the
audio modalities `tango` and `audioldm2`: mel-VAE latent distributions of the clips' log-mels, no
flips, and each unique prompt's conditioning with its attention mask, mmalign/modalities/audio_cache.py;
for the edit families: each record's conditioning about its sources, mmalign/modalities/edit_cache.py;
for Wan image-to-video: each record's first-frame condition and CLIP image states,
mmalign/families/_wan_i2v_cache.py).

Several processes split the shards: `accelerate launch -m mmalign.cli cache CONFIG` (or
torchrun). A killed run continues where it stopped when started again with the same config.
`mmalign train` with the same config then reads the cache (mmalign/modalities/diffusion_cache.py).
"""

from __future__ import annotations

import argparse


def cache_size(folder: str) -> float:
    """MiB of the files under `folder`."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    import torch

    from mmalign.config import load_config
    from mmalign.errors import ConfigError
    from mmalign.families import all_families, get_family
    from mmalign.modalities.edit_cache import cache_writer_for

    cfg = load_config(args.config, args.overrides)
    if not cfg.diffusion.cache_dir:
        raise ConfigError("mmalign cache needs diffusion.cache_dir (where to write the cache)")
    family = get_family(cfg.modality)
    if not family.cache:
        cached = ", ".join(f.name for f in all_families() if f.cache)
        raise ConfigError(f"mmalign cache: modality '{cfg.modality}' has no latent cache ({cached})")

    # As the trainer's accelerator: on a machine without CUDA, cpu=True lets torchrun start gloo processes.
    state = PartialState(cpu=cfg.train.cpu or not torch.cuda.is_available())
    _, likelihood, _ = family.build(cfg, use_cache=False, trained=False)  # VAE + text encoders, no UNet
    likelihood.to(state.device)
    write = cache_writer_for(likelihood)
    stats = write(cfg, likelihood, state.process_index, state.num_processes, state.wait_for_everyone,
                  progress=cfg.train.progress and state.is_main_process)
    if state.is_main_process:
        records = ", ".join(f"{n} {name} records" for name, n in stats["records"].items())
        text = "text per record" if stats.get("per_record") else f"{stats['captions']} unique captions"
        print(f"[mmalign] cache: {records}, {text}; shards of this process: "
              f"{stats['written']} written, {stats['reused']} already there; {state.num_processes} process(es); "
              f"{cache_size(cfg.diffusion.cache_dir):.1f} MiB in {cfg.diffusion.cache_dir} (index {stats['index']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="encode diffusion latents and text embeddings once: mmalign cache CONFIG "
                                     "[section.key=value ...] (needs diffusion.cache_dir)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. diffusion.cache_dtype=float32")
    p.set_defaults(func=run)
