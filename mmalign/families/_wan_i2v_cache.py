"""The latent cache of Wan image-to-video (`mmalign cache` of a WanImageToVideoPipeline folder,
mmalign/families/_wan_i2v.py): everything the I2V transformer call needs, encoded once, so training
loads no VAE, no UMT5 encoder and no CLIP image encoder.

What is stored under `diffusion.cache_dir` (the flow cache's layout, diffusion_cache.py, plus one
per-record table, as the edit families store their sources, edit_cache.py):
- `<split>/latents-NNNNN.safetensors`: each chosen / rejected clip's normalised posterior
  ((mean - μ) / σ, std / σ) (z, f, h, w) with its crop facts, read by `CachedLatents` with the uncached
  draw's randomness (the video latents of Wan T2V, `VideoLatents.cache_item`);
- `text/`: each unique prompt's UMT5 states at its real length (ragged.py) and the null prompt "",
  read by `CachedText` (caption dropout drops the prompt only, as live);
- `i2v/<split>-NNNNN.safetensors` (records [k·S, (k+1)·S), S = cache_shard_size), one row per record:
  `condition`     (n, 4 + z, f, h, w)  [first-frame mask m, normalised VAE mode of [image, zeros x (F - 1)]],
                                       exactly `WanImageSource.condition` (WanImageToVideoPipeline.prepare_latents);
  `image_embeds`  (n, 257, D)          Wan 2.1 I2V only: CLIP hidden_states[-2] (`encode_image`);
  metadata {"sources": [key, ...]} the 64-bit `output_key` of each record's `source_image`, checked at
  read time (a record whose source changed is a `CacheError` naming its row).

The plan carries {"i2v_cache": 1, "image_embeds": bool}: a text-to-video cache, or one without CLIP states
for a transformer with `image_dim` (or the reverse), is refused at load. Writing is resumable and atomic
as the edit cache's: each (split, shard) task writes its i2v shard, then its latent shard; a task whose
latent shard exists is done, so a killed run re-encodes only unfinished shards; `index.json` last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

import mmalign.modalities.cache_writer as cw
from mmalign.errors import CacheError, DataError
from mmalign.families._wan_i2v import SOURCE, WanI2VConditioning, WanImageSource
from mmalign.layout import batch_slots
from mmalign.modalities.diffusion import DiffusionLikelihood
from mmalign.modalities.diffusion_cache import (CachedLatents, CachedText, LatentCache, _as_read, _record_wheres,
                                                cache_splits, open_cache, output_key)
from mmalign.modalities.loading import denoiser_config, load_parts

I2V = "i2v"


def i2v_settings(image_embeds: bool) -> dict[str, Any]:
    """The plan settings of an I2V cache (checked when training reads it)."""
    return {"i2v_cache": 1, "image_embeds": image_embeds}


def i2v_shard_name(split: str, k: int) -> str:
    """Relative path of the source conditioning of records [k·S, (k+1)·S) of `split`."""
    return f"{I2V}/{split}-{k:05d}.safetensors"


# -- writing ---------------------------------------------------------------------------------
def encode_i2v_shard(image: WanImageSource, records: Sequence[dict[str, Any]], split: str, rows: range,
                     dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, str]]:
    """condition (n, 4 + z, f, h, w) [, image_embeds (n, 257, D)] of records `rows` in the cache dtype,
    each source encoded alone (`WanImageSource.encode_record`); metadata: their source keys."""
    parts: dict[str, list[Tensor]] = {}
    keys = []
    for row in rows:
        where = f"{split} row {row}, {SOURCE}"
        for name, value in image.encode_record(records[row], where).items():
            parts.setdefault(name, []).append(cw._storage(value, dtype, where))
        keys.append(output_key(records[row][SOURCE]))
    return {k: torch.stack(v) for k, v in parts.items()}, {"sources": json.dumps(keys)}


def write_i2v_cache(cfg: Any, likelihood: DiffusionLikelihood, rank: int = 0, world: int = 1,
                    barrier: Callable[[], None] = lambda: None, progress: bool = False) -> dict[str, Any]:
    """`cache_writer.write_cache` of an I2V likelihood (module docstring): process `rank` of `world`
    encodes tasks rank, rank + world, ...; finished shards are kept (resume); rank 0 writes the index.
    Returns this process's {"written", "reused"} shards, "captions", "records", "index"."""
    cache_dir = Path(cfg.diffusion.cache_dir)
    splits = cache_splits(cfg)
    image = likelihood.conditioning.image
    plan = cw.make_plan(cfg, splits, {**likelihood.latents.cache_settings(cfg),
                                      **i2v_settings(image.image_encoder is not None)})
    cw.check_plan(cache_dir, plan)
    barrier()
    if rank == 0:
        cw.write_json_atomic(plan, cache_dir / "plan.json")
    settings, size = plan["settings"], plan["settings"]["shard_size"]

    def encode(name: str, k: int) -> tuple[dict[str, Tensor], dict[str, str]]:
        records, kind = splits[name]
        rows = range(k * size, min(len(records), (k + 1) * size))
        tensors, metadata = encode_i2v_shard(image, records, name, rows, getattr(torch, settings["dtype"]))
        cw.save_atomic(tensors, cache_dir / i2v_shard_name(name, k), metadata)  # before its latent shard
        return cw.encode_latent_shard(likelihood, records, kind, name, rows, settings)

    tasks = [(name, k) for name, split in plan["splits"].items() for k in range(split["num_shards"])]
    written, reused = cw._run_tasks(tasks[rank::world], cache_dir, encode, "cache videos", progress)
    barrier()
    captions, w, r = cw.write_text_tables(likelihood, cache_dir, plan, rank, world, progress)
    barrier()
    if rank == 0:
        index = cw.make_index(cache_dir, plan, captions, likelihood)
        index[I2V] = {name: [i2v_shard_name(name, k) for k in range(split["num_shards"])]
                      for name, split in plan["splits"].items()}
        missing = [f for names in index[I2V].values() for f in names if not (cache_dir / f).is_file()]
        if missing:
            raise CacheError(f"{cache_dir}: {len(missing)} shard(s) missing after every process finished, "
                             f"e.g. {missing[0]}; run mmalign cache again")
        cw.write_json_atomic(index, cache_dir / "index.json")
    barrier()
    return {"written": written + w, "reused": reused + r, "captions": len(captions),
            "records": {name: len(records) for name, (records, _) in splits.items()},
            "index": str(cache_dir / "index.json")}


def cache_writer_of(likelihood: DiffusionLikelihood) -> Callable[..., dict[str, Any]] | None:
    """`write_i2v_cache` for an I2V likelihood, else None."""
    return write_i2v_cache if isinstance(likelihood.conditioning, WanI2VConditioning) else None


# -- reading (training) ------------------------------------------------------------------------
class CachedI2V:
    """The I2V conditioning source from the cache: the prompt (`CachedText`: dropped captions -> the
    cached "") and each record's cached source conditioning (never dropped); nothing is encoded live."""

    text_encoders: list[Any] = []
    tokenizers: list[Any] = []

    def __init__(self, cache: LatentCache, null_prompt: str) -> None:
        self.cache, self.text = cache, CachedText(cache, null_prompt)
        self._sources: dict[str, list[int]] = {}

    def to(self, device: torch.device | str) -> None:
        """Nothing frozen to move."""

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        raise CacheError("a cached image-to-video likelihood has no text encoder: prompts are looked up in the cache")

    def sources(self, relative: str) -> list[int]:
        if relative not in self._sources:
            self._sources[relative] = json.loads(self.cache.file(relative).metadata()["sources"])
        return self._sources[relative]

    def read_record(self, record: dict[str, Any], kind: str, where: str) -> dict[str, Tensor]:
        """A record's cached condition [, image_embeds] (1, ...) float32, found by its outputs
        (`LatentCache.locate`) and checked against its source image's key."""
        if SOURCE not in record:
            raise DataError(f"{where}, {SOURCE}: image-to-video records need a '{SOURCE}' (the first frame's image)")
        split, shard, row = self.cache.locate(record, kind, where)[0]
        offset = row // self.cache.index["splits"][split]["items_per_record"]
        relative = self.cache.index[I2V][split][shard]
        if self.sources(relative)[offset] != output_key(record[SOURCE]):
            raise CacheError(f"{where}: its {SOURCE} differs from the cache {self.cache.dir} (the data changed since "
                             "`mmalign cache`?); rerun mmalign cache with an empty diffusion.cache_dir")
        f = self.cache.file(relative)
        return {name: _as_read(f.get_slice(name)[offset : offset + 1]) for name in f.keys()}

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """The prompt's cached tensors (`CachedText.collate`) and i2v/condition (N, 4 + z, f, h, w)
        [, i2v/image_embeds (N, 257, D)] of each item's record (flatten order)."""
        per_record = [self.read_record(r, kind, w) for r, w in zip(records, _record_wheres(records))]
        items = [per_record[i] for i, _ in batch_slots(records, kind)]
        out = self.text.collate(records, kind)
        out.update({f"{I2V}/{name}": torch.cat([it[name] for it in items]) for name in items[0]})
        return out

    def per_item(self, inputs: dict[str, Any], groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        """The prompt (null where the group's caption is `dropped`) and each group's source conditioning,
        as `WanI2VConditioning.per_item` gives them."""
        first = (groups[None, :] == torch.arange(int(groups.max()) + 1)[:, None]).int().argmax(1)
        out = self.text.per_item(inputs, groups, dropped)
        for key in [k for k in inputs if k.startswith(f"{I2V}/")]:
            out[key[len(I2V) + 1:]] = inputs[key][first][groups]
        return out


def build_i2v_cached(cfg: Any, family: Any, denoiser: Any, trained: bool,
                     objective: Callable[[Any, tuple[int, ...]], Any],
                     latents_extra: dict[str, Any]) -> tuple[Any, DiffusionLikelihood, None]:
    """(transformer, I2V likelihood reading `diffusion.cache_dir`, None): only the transformer (when
    trained) and the scheduler are loaded; the cache is checked against the config, the data, the
    latent channels and whether the transformer takes CLIP image states (its `image_dim`)."""
    parts = load_parts(cfg, family, unet=trained, frozen=False)
    config = denoiser_config(cfg, family)
    extra = {**latents_extra, **i2v_settings(vars(config).get("image_dim") is not None)}
    cache = open_cache(cfg, family, denoiser.latent_channels(config), extra)
    d = cfg.diffusion
    chosen = objective(parts["scheduler"], tuple(cache.index["latent"]["shape"]))
    likelihood = DiffusionLikelihood(family, chosen, CachedLatents(cache, d), CachedI2V(cache, d.null_prompt),
                                     denoiser, d)
    return parts["unet"], likelihood, None
