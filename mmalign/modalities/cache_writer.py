"""Writing the Diffusion-DPO cache (`mmalign cache CONFIG`): what is stored, the layout and
the design decisions are described in `mmalign.modalities.diffusion_cache`, which reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mmalign.io import atomic_path
from mmalign.seeds import RUN, mix_seed
from mmalign.modalities.diffusion import DiffusionLikelihood
from mmalign.modalities.text import _prompt_text
from mmalign.modalities.diffusion_cache import (
    CACHE_VERSION, TEXT, CacheError, cache_splits, output_key, record_outputs, shard_name,
)


def save_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written to a temp name in the same folder, then renamed: a file that
    exists is complete (a kill leaves at most a stale `.tmp-*`, overwritten on the rerun)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_json_atomic(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def _storage(x: Tensor, dtype: torch.dtype, where: str) -> Tensor:
    out = x.to(dtype)
    if not torch.isfinite(out).all():
        raise CacheError(f"{where}: values not finite in {dtype} (max |x| {x.abs().max():.3g}); "
                         "use diffusion.cache_dtype=float32")
    return out


def make_plan(cfg: Any, splits: dict[str, tuple[Sequence[dict[str, Any]], str]],
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the cache is made of: settings that change its tensors (`extra`: the latent source's
    own, its `cache_settings`), and each split's shape."""
    from mmalign.config import resolve_path

    d = cfg.diffusion
    settings = {"version": CACHE_VERSION, "modality": cfg.modality, "model": resolve_path(cfg.model.path),
                "vae_path": d.vae_path, "vae_dtype": d.vae_dtype, "variant": d.variant,
                "text_dtype": cfg.model.dtype, "resolution": d.resolution, "crop": d.crop,
                "crop_seed": cfg.train.seed if d.crop == "random" else None, "flips": d.random_flip,
                "dtype": d.cache_dtype, "shard_size": d.cache_shard_size, **(extra or {})}
    shapes = {}
    for name, (records, kind) in splits.items():
        per = len(record_outputs(records[0], kind))
        shapes[name] = {"path": str(getattr(cfg.data, name)), "kind": kind, "num_records": len(records),
                        "items_per_record": per, "num_shards": -(-len(records) // d.cache_shard_size)}
    return {"settings": settings, "splits": shapes}


def check_plan(cache_dir: Path, plan: dict[str, Any]) -> None:
    """A cache_dir already holding another plan is an error naming what differs."""
    path = cache_dir / "plan.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old != plan:
        diff = [f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}"
                for section in ("settings", "splits") for k, v in plan[section].items()
                if old.get(section, {}).get(k) != v]
        raise CacheError(f"{cache_dir} holds a cache of other data or settings ({'; '.join(diff)}); "
                         "delete it or set another diffusion.cache_dir")


def fixed_crop_fraction(settings: dict[str, Any], split: str, row: int) -> Tensor | None:
    """(1, 2) crop fraction of a record, fixed at cache time: None (centre crop) or uniform
    from a generator seeded by (train.seed, split, row), so a rerun or another process repeats it."""
    if settings["crop"] != "random":
        return None
    seed = mix_seed(settings["crop_seed"], row, split != "train", strides=(RUN, 2, 1))
    return torch.rand((1, 2), generator=torch.Generator().manual_seed(seed))


def encode_crops(likelihood: DiffusionLikelihood, crops: list[Tensor], flips: bool) -> dict[str, Tensor]:
    """VAE posteriors of crops (n, 3, res, res): mean, std [mean_flipped, std_flipped] (n, C, h, w)
    float32 on the CPU; the flipped ones encode the mirrored crop."""
    pixels = torch.stack(crops)
    batch = likelihood.settings.vae_batch_size or 8
    mean, std = likelihood.latents.latent_dist(pixels, batch)
    out = {"mean": mean.cpu(), "std": std.cpu()}
    if flips:
        mean, std = likelihood.latents.latent_dist(pixels.flip(-1), batch)
        out.update(mean_flipped=mean.cpu(), std_flipped=std.cpu())
    return out


def encode_latent_shard(likelihood: DiffusionLikelihood, records: Sequence[dict[str, Any]], kind: str, split: str,
                        rows: range, settings: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors of records `rows` (n items, record order) and metadata {"captions": json list}:
    mean, std [mean_flipped, std_flipped] (n, C, h, w) in the cache dtype; key (n,),
    original_size, crop_top_left, crop_top_left_flipped (n, 2) int64; record_index (rows,)."""
    step = likelihood.settings.vae_batch_size or 8
    parts: dict[str, list[Tensor]] = {}
    crops, facts, captions = [], [], []
    for row in rows:
        record = records[row]
        captions.append(_prompt_text(record["prompt"]))
        fraction = fixed_crop_fraction(settings, split, row)
        for slot, value in enumerate(record_outputs(record, kind)):
            pixels, info = likelihood.latents.cache_item(value, f"{split} row {row}, output {slot}", fraction,
                                                         record.get("_root"))
            crops.append(pixels)
            facts.append([output_key(value), *info])
        if len(crops) >= step or row == rows[-1]:
            for name, value in encode_crops(likelihood, crops, settings["flips"]).items():
                parts.setdefault(name, []).append(value)
            crops = []
    dtype, where = getattr(torch, settings["dtype"]), f"{split} rows {rows.start}..{rows.stop - 1}"
    tensors = {name: _storage(torch.cat(v), dtype, where) for name, v in parts.items()}
    facts_t = torch.tensor(facts, dtype=torch.long)
    tensors.update(key=facts_t[:, 0], original_size=facts_t[:, 1:3], crop_top_left=facts_t[:, 3:5],
                   crop_top_left_flipped=facts_t[:, 5:7], record_index=torch.tensor(list(rows), dtype=torch.long))
    return tensors, {"captions": json.dumps(captions)}


def encode_text_shard(likelihood: DiffusionLikelihood, captions: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """Every conditioning tensor of `captions` (n rows), as the conditioning source stores it
    (`cache_text`: images encode in chunks; audio encodes each caption alone, padded to the shard's
    longest with `length/<name>`): floating tensors in the cache dtype, integer ones (masks) as
    they are."""
    tensors = {k: v.cpu() for k, v in likelihood.conditioning.cache_text(captions).items()}
    return {k: _storage(v, dtype, "text embeddings") if v.is_floating_point() else v for k, v in tensors.items()}


def cached_captions(cache_dir: Path, plan: dict[str, Any]) -> list[str]:
    """Unique captions in first-seen order (splits, shards, records), from the shards' metadata."""
    from safetensors import safe_open

    seen: dict[str, None] = {}
    for name, split in plan["splits"].items():
        for k in range(split["num_shards"]):
            with safe_open(str(cache_dir / shard_name(name, k)), framework="pt") as f:
                seen.update(dict.fromkeys(json.loads(f.metadata()["captions"])))
    return list(seen)


def _run_tasks(tasks: list[tuple[str, int]], cache_dir: Path, encode: Callable[[str, int], Any], desc: str,
               progress: bool) -> tuple[int, int]:
    """Encode and write each (split, shard) whose file does not exist yet; (written, reused)."""
    from tqdm.auto import tqdm

    written = reused = 0
    for name, k in tqdm(tasks, desc=desc, disable=not progress):
        path = cache_dir / shard_name(name, k)
        if path.is_file():
            reused += 1
            continue
        tensors, metadata = encode(name, k)
        save_atomic(tensors, path, metadata)
        written += 1
    return written, reused


def make_index(cache_dir: Path, plan: dict[str, Any], captions: list[str],
               likelihood: DiffusionLikelihood) -> dict[str, Any]:
    """The complete cache's index: plan + shard files with their record ranges + captions +
    latent shape/scaling + text table layout. Every listed file must exist."""
    size = plan["settings"]["shard_size"]
    index = {**plan, "splits": {}, "captions": captions}
    for name, split in plan["splits"].items():
        n = split["num_records"]
        shards = [{"file": shard_name(name, k), "start": k * size, "end": min(n, (k + 1) * size)}
                  for k in range(split["num_shards"])]
        index["splits"][name] = {**split, "shards": shards}
    num_text = -(-len(captions) // size)
    shift, scale = likelihood.latents.latent_scaling()
    index["latent"] = {"shape": list(likelihood.latents.latent_shape()), "shift_factor": shift, "scaling_factor": scale}
    index["text"] = {"shard_size": size, "files": [shard_name(TEXT, k) for k in range(num_text)],
                     "null": shard_name("null", 0)}
    files = [s["file"] for split in index["splits"].values() for s in split["shards"]] + index["text"]["files"]
    missing = [f for f in files + [index["text"]["null"]] if not (cache_dir / f).is_file()]
    if missing:
        raise CacheError(f"{cache_dir}: {len(missing)} shard(s) missing after every process finished, "
                         f"e.g. {missing[0]}; run mmalign cache again")
    return index


def write_text_tables(likelihood: DiffusionLikelihood, cache_dir: Path, plan: dict[str, Any], rank: int = 0,
                      world: int = 1, progress: bool = False) -> tuple[list[str], int, int]:
    """After every latent shard exists: the unique captions of their metadata (`cached_captions`) and the
    text table of them plus the null prompt, tasks rank, rank + world, ... of this process; returns
    (captions, written, reused)."""
    captions = cached_captions(cache_dir, plan)
    settings = plan["settings"]
    size, dtype = settings["shard_size"], getattr(torch, settings["dtype"])

    def encode_text(name: str, k: int) -> tuple[dict[str, Tensor], None]:
        return encode_text_shard(likelihood, [""] if name == "null" else captions[k * size : (k + 1) * size], dtype), None

    text_tasks = [(TEXT, k) for k in range(-(-len(captions) // size))] + [("null", 0)]
    written, reused = _run_tasks(text_tasks[rank::world], cache_dir, encode_text, "cache text", progress)
    return captions, written, reused


def write_cache(cfg: Any, likelihood: DiffusionLikelihood, rank: int = 0, world: int = 1,
                barrier: Callable[[], None] = lambda: None, progress: bool = False) -> dict[str, Any]:
    """Encode the train (and eval) data of `cfg` into `diffusion.cache_dir` (see the module
    docstring). Process `rank` of `world` encodes shards rank, rank + world, ...; existing
    shards are kept (resume); the main process (rank 0) writes index.json last.

    Returns this process's counts: {"written", "reused"} shards, "captions", "index" (path)."""
    cache_dir = Path(cfg.diffusion.cache_dir)
    splits = cache_splits(cfg)
    plan = make_plan(cfg, splits, likelihood.latents.cache_settings(cfg))
    check_plan(cache_dir, plan)
    barrier()  # every process checked the old plan before the main one replaces it
    if rank == 0:
        write_json_atomic(plan, cache_dir / "plan.json")
    settings, size = plan["settings"], plan["settings"]["shard_size"]

    def encode_latents(name: str, k: int) -> tuple[dict[str, Tensor], dict[str, str]]:
        records, kind = splits[name]
        rows = range(k * size, min(len(records), (k + 1) * size))
        return encode_latent_shard(likelihood, records, kind, name, rows, settings)

    tasks = [(name, k) for name, split in plan["splits"].items() for k in range(split["num_shards"])]
    written, reused = _run_tasks(tasks[rank::world], cache_dir, encode_latents, "cache latents", progress)
    barrier()
    captions, w, r = write_text_tables(likelihood, cache_dir, plan, rank, world, progress)
    barrier()
    if rank == 0:
        write_json_atomic(make_index(cache_dir, plan, captions, likelihood), cache_dir / "index.json")
    barrier()
    return {"written": written + w, "reused": reused + r, "captions": len(captions),
            "records": {name: len(records) for name, (records, _) in splits.items()},
            "index": str(cache_dir / "index.json")}


