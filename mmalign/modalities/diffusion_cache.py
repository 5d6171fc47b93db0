"""Diffusion-DPO from a cache: VAE latent distributions and text embeddings encoded ONCE
(`mmalign cache CONFIG`, written by `mmalign.modalities.cache_writer`), then training reads
them here and never loads the VAE or a text encoder.

What is cached (METHODS.md §2: "cache the distribution's mean and std, not one sample"):
- per image of the train and eval data: the VAE posterior's mean and std (C, h, w), unscaled,
  of the cropped image AND of its horizontal mirror (a second latent, the VAE is not
  flip-equivariant), with the original size (h, w) and the crop's top-left in the unflipped and
  in the flipped image (SDXL's add_time_ids);
- per UNIQUE caption: every tensor the denoiser needs (SD1.5/SD2: `encoder_hidden_states`; SDXL:
  `encoder_hidden_states` + pooled `text_embeds`; SD3 / FLUX: the T5 (+ CLIP) sequence and
  `pooled_projections`; Z-Image: the Qwen3 states and their mask), plus the null prompt
  `encode("")`; the flow families' objective takes its shift from the cached latents' size.
  Conditioning that is zeros past each prompt (Wan's 512 UMT5 states; Qwen-Image's and Z-Image's
  states + mask) is stored at each prompt's real length and rebuilt on read (modalities/ragged.py);
- audio (`tango`, `audioldm2`; hooks on the likelihood, reader classes in `audio_cache.py`): per
  clip the mel-VAE posterior of its log-mel (no flip, no crop); per unique prompt its own-length
  conditioning with the attention mask (int64) and `length/<name>`, padded per batch at train time.

Per step, `DiffusionLikelihood.draw` with the cache's sources (`CachedLatents`, `CachedText`)
makes exactly the uncached draw's random choices from each pair's generator, in the same order
(`draw_choices`'s flip, crop fraction, caption dropout, t; then ε (G, C, h, w); then the latent
sample η (N, C, h, w) in `CachedLatents.sample`), and forms
latents = (mean + std · η - shift) · scale. So with the same records and seed, cached and
uncached training see the same t, ε, η, flips and dropped captions, hence the same loss (up to
the storage dtype's rounding).

Design decisions:
- Crop: decided at cache time. `diffusion.crop: center` caches the centre crop, which is
  exactly the uncached centre crop (cached == uncached). `crop: random` caches ONE random crop
  per record, drawn from a generator seeded by (train.seed, split, row) and stored; both images
  of a pair share that fraction, so same-size images get the same crop, as in the uncached draw.
  A per-step random crop would need every crop's latent (or the VAE at train time), defeating
  the cache; the crop fraction still drawn by `draw_choices` is discarded, so t and ε stay
  aligned with the uncached draw. Flips and caption dropout remain per-step random choices.
- Dtype (`diffusion.cache_dtype`): float16 by default. It halves the disk (SDXL 1024²: mean +
  std + their flips = 4 x 4x128x128 values = 512 KiB per image in fp16, ~850 GiB for Pick-a-Pic
  v2's 1.7 M images), and its rounding (relative 2^-11 ≈ 5e-4 of the mean, ~1e-3 after SDXL's
  scaling) is far below the posterior noise the official recipe adds every step and the ε of the
  ELBO. Latent means (|x| < ~100) cannot overflow fp16's 65504; a non-finite value is refused
  at write time. float32 keeps everything exact. bfloat16 (2^-8) is not offered.
- Layout under `diffusion.cache_dir`: `plan.json` (settings and data shape, checked on resume),
  `<split>/latents-NNNNN.safetensors` (records [k·S, (k+1)·S), S = cache_shard_size; items in
  record order: chosen, rejected per pair), `text/text-NNNNN.safetensors` (S captions each),
  `text/null.safetensors`, and `index.json` (the complete cache: shards, record ranges, captions,
  latent shape and scaling), written last by the main process. Every file is written to a temp
  name and renamed (atomic), so a file that exists is complete: a killed run continues from the
  shards it finished, nothing re-encoded. Shard k of the combined task list goes to process
  k mod P (accelerate); the captions are gathered from the latent shards' metadata, so the data
  is read once.
- Records are found by their `_index` (trainer.fetch) and checked against a 64-bit key of each
  output (the image path, or a hash of its bytes) stored with the latents: train first, then
  eval; an output found at no row (KTO's mismatched items) is looked up by key. Captions are
  looked up by text. A record or caption not in the cache is a `CacheError` naming it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mmalign.errors import CacheError
from mmalign.families import Family
from mmalign.layout import batch_slots, item_slots, record_outputs
from mmalign.modalities.diffusion import DiffusionLikelihood, ElboObjective, sample_latents
from mmalign.modalities.text import _prompt_text
from mmalign.modalities.loading import denoiser_config, load_parts
from mmalign.tensors import right_pad_cat

CACHE_VERSION = 1
TEXT = "text"


# -- keys, layout, atomic files ------------------------------------------------------------
def output_key(value: Any) -> int:
    """Signed 64-bit key of an output as `DiffusionLikelihood._image` reads it: its bytes when
    it has any (hashed), otherwise its path string as written in the record; a decoded clip
    ({"array", "sampling_rate"} or (waveform, rate), `mmalign.data.audio.read_waveform`) by its
    samples and rate."""
    if isinstance(value, tuple) and len(value) == 2:
        value = {"array": value[0], "sampling_rate": value[1]}
    if isinstance(value, dict) and value.get("array") is not None:
        import numpy as np

        samples = np.ascontiguousarray(np.asarray(value["array"], dtype=np.float32))
        value = f"array:{samples.shape}:{value.get('sampling_rate')}:".encode() + samples.tobytes()
    elif isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    h = hashlib.blake2b(digest_size=8)
    if isinstance(value, (bytes, bytearray)):
        h.update(b"bytes:" + bytes(value))
    else:
        h.update(b"path:" + str(value).encode())
    return int.from_bytes(h.digest(), "little", signed=True)


def shard_name(split: str, k: int) -> str:
    """Relative path of shard k of a split ("train", "eval"), of the text table ("text") or
    the null prompt ("null")."""
    if split == "null":
        return f"{TEXT}/null.safetensors"
    return f"{TEXT}/text-{k:05d}.safetensors" if split == TEXT else f"{split}/latents-{k:05d}.safetensors"


# -- the plan: settings and data shape, identical in every process ---------------------------
def cache_splits(cfg: Any) -> dict[str, tuple[Sequence[dict[str, Any]], str]]:
    """{"train": (records, kind)[, "eval": ...]} read as the trainer reads them."""
    from mmalign.data.preference import load_run_split

    splits = {"train": load_run_split(cfg, "train")}
    if cfg.data.eval:
        splits["eval"] = load_run_split(cfg, "eval", splits["train"][1])
    return splits


# -- encoding (mmalign cache) ---------------------------------------------------------------


# -- reading (training) ----------------------------------------------------------------------
def _as_read(x: Tensor) -> Tensor:
    """float32 for stored floating tensors (float16 storage), integer tensors (masks) as they are."""
    return x.float() if x.is_floating_point() else x


class LatentCache:
    """Read access to a complete cache (`index.json`): latents and facts of items by location
    (split, shard, item row), text tensors by caption row, the null prompt. safetensors files
    are opened lazily (memory-mapped; the last 64 kept open), tensors read row by row."""

    MAX_OPEN = 64

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        path = self.dir / "index.json"
        if not path.is_file():
            unfinished = " (plan.json is there: an earlier run did not finish; rerun it)" if (
                self.dir / "plan.json").is_file() else ""
            raise CacheError(f"no complete cache in {self.dir}{unfinished}: run `mmalign cache CONFIG` "
                             "first, or unset diffusion.cache_dir")
        self.index = json.loads(path.read_text())
        self.settings = self.index["settings"]
        self.caption_rows = {c: i for i, c in enumerate(self.index["captions"])}
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._keys: dict[tuple[str, int], list[int]] = {}
        self._key_table: dict[int, tuple[str, int, int]] | None = None
        from safetensors.torch import load_file

        from mmalign.modalities.ragged import unpack

        null = unpack(load_file(str(self.dir / self.index["text"]["null"])))
        self.null = {k: _as_read(v) for k, v in null.items()}

    def file(self, relative: str) -> Any:
        """An open safetensors handle (LRU of MAX_OPEN)."""
        from safetensors import safe_open

        if relative not in self._files:
            if len(self._files) >= self.MAX_OPEN:
                self._files.popitem(last=False)
            self._files[relative] = safe_open(str(self.dir / relative), framework="pt")
        self._files.move_to_end(relative)
        return self._files[relative]

    def keys(self, split: str, shard: int) -> list[int]:
        """Output keys of a latent shard's items (record order)."""
        if (split, shard) not in self._keys:
            self._keys[(split, shard)] = self.file(shard_name(split, shard)).get_tensor("key").tolist()
        return self._keys[(split, shard)]

    def _by_key(self, key: int) -> tuple[str, int, int] | None:
        """Location of an output by its key alone (built once, on the first record that is not at
        its `_index` row, e.g. KTO's mismatched items)."""
        if self._key_table is None:
            self._key_table = {}
            for name, split in self.index["splits"].items():
                for k in range(len(split["shards"])):
                    for row, stored in enumerate(self.keys(name, k)):
                        self._key_table.setdefault(stored, (name, k, row))
        return self._key_table.get(key)

    def locate(self, record: dict[str, Any], kind: str, where: str) -> list[tuple[str, int, int]]:
        """(split, shard, item row) of each output of a record: at its `_index` row of the train,
        then the eval split when the stored keys match; otherwise by key."""
        keys = [output_key(v) for v in record_outputs(record, kind)]
        row = record.get("_index")
        for name, split in self.index["splits"].items():
            if row is None or not 0 <= row < split["num_records"] or split["items_per_record"] != len(keys):
                continue
            shard, offset = divmod(int(row), self.settings["shard_size"])
            first = offset * len(keys)
            if self.keys(name, shard)[first : first + len(keys)] == keys:
                return [(name, shard, first + j) for j in range(len(keys))]
        found = [self._by_key(key) for key in keys]
        if any(f is None for f in found):
            raise CacheError(f"{where}: its image(s) are not in the cache {self.dir} (the data changed since "
                             "`mmalign cache`?); rerun mmalign cache with an empty diffusion.cache_dir")
        return found  # type: ignore[return-value]

    def caption_row(self, text: str, where: str) -> int:
        if text not in self.caption_rows:
            raise CacheError(f"{where}: caption {text[:60]!r} is not in the cache {self.dir}; rerun mmalign cache")
        return self.caption_rows[text]

    def read_items(self, locations: list[tuple[str, int, int]], flipped: bool) -> dict[str, Tensor]:
        """Per location (N items): latent_mean, latent_std [+ _flipped] (N, C, h, w) float32;
        original_sizes, crop_top_left, crop_top_left_flipped (N, 2) int64."""
        names = {"mean": "latent_mean", "std": "latent_std", "original_size": "original_sizes",
                 "crop_top_left": "crop_top_left", "crop_top_left_flipped": "crop_top_left_flipped"}
        if flipped:
            names.update(mean_flipped="latent_mean_flipped", std_flipped="latent_std_flipped")
        rows: dict[str, list[Tensor]] = {v: [] for v in names.values()}
        for split, shard, row in locations:
            f = self.file(shard_name(split, shard))
            for stored, name in names.items():
                rows[name].append(f.get_slice(stored)[row : row + 1])
        return {k: torch.cat(v).float() if k.startswith("latent") else torch.cat(v) for k, v in rows.items()}

    def read_text(self, caption_rows: list[int]) -> dict[str, Tensor]:
        """Text tensors (n, ...) of caption rows (the text table's rows): float32, integer ones
        (attention masks, per-row lengths `length/<name>`) as stored. A variable-length table
        (audio: each shard padded to its longest caption, with `length/<name>`) has rows of
        several lengths: they are right-padded with zeros to the longest of `caption_rows`. Tensors
        stored at each prompt's real length (`ragged/<name>`, mmalign/modalities/ragged.py) come back
        padded with zeros to their stored width, as the live encoder gives them."""
        from mmalign.modalities.ragged import read_row

        size, files = self.index["text"]["shard_size"], self.index["text"]["files"]
        out: dict[str, list[Tensor]] = {}
        for row in caption_rows:
            shard, offset = divmod(row, size)
            f = self.file(files[shard])
            for name, value in read_row(f.get_slice, list(f.keys()), offset).items():
                out.setdefault(name, []).append(value)
        return {k: _as_read(right_pad_cat(v)) for k, v in out.items()}

    def check(self, cfg: Any, num_records: dict[str, int], channels: int | None = None,
              extra: dict[str, Any] | None = None) -> None:
        """Raise a `CacheError` naming the first way the cache does not fit the config and data;
        `channels`: the latent channels the denoiser takes (None: unchecked); `extra`: the latent
        source's own settings (`cache_settings`, e.g. audio's mel)."""
        s, d, splits = self.settings, cfg.diffusion, self.index["splits"]
        expected = {"modality": cfg.modality, "resolution": d.resolution, "crop": d.crop, **(extra or {})}
        problems = [f"{key}: cache {s.get(key)!r}, config {now!r}" for key, now in expected.items()
                    if s.get(key) != now]
        if d.random_flip and not s["flips"]:
            problems.append("diffusion.random_flip is on but the cache holds no flipped latents")
        for name, n in num_records.items():
            if name not in splits:
                problems.append(f"no {name} split in the cache")
            elif splits[name]["num_records"] != n:
                problems.append(f"{name}: cache has {splits[name]['num_records']} records, data has {n}")
        if channels is not None and channels != self.index["latent"]["shape"][0]:
            problems.append(f"the denoiser takes {channels} latent channels, the cache holds "
                            f"{self.index['latent']['shape'][0]}")
        if problems:
            raise CacheError(f"the cache in {self.dir} does not match the config/data: {'; '.join(problems)}. "
                             "Rerun mmalign cache with another diffusion.cache_dir")


# -- the sources ------------------------------------------------------------------------------
def _record_wheres(records: list[dict[str, Any]]) -> list[str]:
    return [f"row {r.get('_index', i)}" for i, r in enumerate(records)]


class CachedLatents:
    """A latent source reading each item's cached VAE posterior (mean, std [+ flipped]) and
    facts by record (no image decoding, no VAE) and sampling it with exactly the uncached draw's
    randomness (module docstring). vae is None."""

    items_key = "latent_mean"
    vae = None

    def __init__(self, cache: LatentCache, settings: Any) -> None:
        self.cache, self.settings = cache, settings

    def to(self, device: torch.device | str) -> None:
        """Nothing frozen to move."""

    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.cache.index["latent"]["shape"])  # type: ignore[return-value]

    def latent_scaling(self) -> tuple[float | None, float]:
        latent = self.cache.index["latent"]
        return latent["shift_factor"], float(latent["scaling_factor"])

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """latent_mean, latent_std [+ latent_mean_flipped, latent_std_flipped] (N, C, h, w)
        float32; original_sizes, crop_top_left, crop_top_left_flipped (N, 2) (flatten order)."""
        locations = [self.cache.locate(r, kind, w) for r, w in zip(records, _record_wheres(records))]
        slots = item_slots(kind, [len(found) for found in locations])
        return self.cache.read_items([locations[i][j] for i, j in slots], self.settings.random_flip)

    def sample(self, inputs: dict[str, Any], groups: Tensor, flip: Tensor, crop_fraction: Tensor,
               eta: Any) -> tuple[Tensor, Tensor]:
        """latents = (mean + std · η - shift) · scale of the flipped or unflipped cached posterior,
        η = `eta(shape)` (the uncached draw's per-item latent sample); crop_fraction is unused
        (the crop was fixed at cache time). Returns x0 (N, C, h, w) and the crop top-left (N, 2)."""
        noise_eta = eta(inputs["latent_mean"].shape)
        flipped = flip[groups].to(inputs["latent_mean"].device)
        mean, std = inputs["latent_mean"], inputs["latent_std"]
        if bool(flipped.any()):
            mask = flipped.view(-1, *[1] * (mean.ndim - 1))  # (N, C, h, w) images, (N, C, f, h, w) videos
            mean = torch.where(mask, inputs["latent_mean_flipped"], mean)
            std = torch.where(mask, inputs["latent_std_flipped"], std)
        crop_top_left = torch.where(flipped[:, None], inputs["crop_top_left_flipped"], inputs["crop_top_left"]).cpu()
        return sample_latents(mean, std, noise_eta, *self.latent_scaling()), crop_top_left


class CachedText:
    """A conditioning source reading each item's caption tensors from the cache (no text encoder):
    the caption's, or the null prompt's where the group's caption is dropped (`null_prompt:
    empty`), or zeros (`null_prompt: zeros`), as the live `TextConditioning`."""

    text_encoders: list[Any] = []  # nothing is encoded live
    tokenizers: list[Any] = []

    def __init__(self, cache: LatentCache, null_prompt: str) -> None:
        self.cache, self.null_prompt = cache, null_prompt

    def to(self, device: torch.device | str) -> None:
        """Nothing frozen to move."""

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        raise CacheError("a cached likelihood has no text encoder: captions are looked up in the cache")

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """caption_rows (N,); prompt/<name> (N, ...) text tensors (prompt/encoder_hidden_states
        (N, L, D) [, prompt/text_embeds (N, P)]), flatten order."""
        wheres = _record_wheres(records)
        slots = batch_slots(records, kind)
        rows = torch.tensor([self.cache.caption_row(_prompt_text(records[i]["prompt"]), wheres[i]) for i, _ in slots])
        unique, inverse = rows.unique(return_inverse=True)
        inputs: dict[str, Tensor] = {f"prompt/{k}": v[inverse] for k, v in self.cache.read_text(unique.tolist()).items()}
        inputs["caption_rows"] = rows
        return inputs

    def per_item(self, inputs: dict[str, Any], groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        item_dropped = dropped[groups]
        out = {}
        for key, value in inputs.items():
            if not key.startswith("prompt/"):
                continue
            name, mask = key[len("prompt/"):], item_dropped.to(value.device).view(-1, *[1] * (value.ndim - 1))
            if self.null_prompt == "empty":
                value = torch.where(mask, self.cache.null[name].to(value.device), value)
            else:
                value = value * (~mask).to(value.dtype)
            out[name] = value
        return out


def open_cache(cfg: Any, family: Family, channels: int | None,
               latents_extra: dict[str, Any] | None = None) -> LatentCache:
    """The complete cache of `diffusion.cache_dir`, checked against the config, the data and the
    denoiser's latent `channels` (`LatentCache.check`); validation images are refused (no VAE or
    text encoder is loaded)."""
    from mmalign.errors import ConfigError

    if cfg.train.validate_every and family.validation:
        raise ConfigError("train.validate_every samples images with the VAE and text encoders, which a run "
                          "from diffusion.cache_dir does not load; set train.validate_every=0")
    cache = LatentCache(cfg.diffusion.cache_dir)
    cache.check(cfg, {name: len(records) for name, (records, _) in cache_splits(cfg).items()}, channels, latents_extra)
    return cache


def build_cached(cfg: Any, family: Family, denoiser: Any, trained: bool = True,
                 objective: Callable[[Any, tuple[int, int, int]], Any] | None = None,
                 latents_extra: dict[str, Any] | None = None) -> tuple[Any, DiffusionLikelihood, None]:
    """(denoiser, image likelihood reading `diffusion.cache_dir`, None): only the denoiser (when
    trained) and the scheduler are loaded; latents and text from the cache (`CachedLatents`,
    `CachedText`). objective(scheduler, latent_shape): the family's (flow families: the shift of
    the cached latents' size); default the ELBO. latents_extra: the live latent source's
    `cache_settings` the cache must match (videos: num_frames)."""
    parts = load_parts(cfg, family, unet=trained, frozen=False)
    channels = denoiser.latent_channels(denoiser_config(cfg, family))
    cache = open_cache(cfg, family, channels, latents_extra)
    d = cfg.diffusion
    shape = tuple(cache.index["latent"]["shape"])
    chosen = objective(parts["scheduler"], shape) if objective else ElboObjective(parts["scheduler"], d.prediction_type)
    likelihood = DiffusionLikelihood(family, chosen, CachedLatents(cache, d), CachedText(cache, d.null_prompt), denoiser, d)
    return parts["unet"], likelihood, None
