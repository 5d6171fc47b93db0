"""The edit families' cache (`mmalign cache CONFIG` with `modality: qwen_image_edit`,
`qwen_image_edit_plus` or `flux_kontext`; mmalign/modalities/edit.py): an edit's conditioning
depends on (instruction, source images), and a dropped caption is the empty instruction about the
SAME sources, so the conditioning is cached per RECORD, not per unique caption:

- the chosen / rejected latents: the flow families' latent shards (`cache_writer.encode_latent_shard`:
  VAE posterior mean and std of each cropped target; no flips, `random_flip` is refused for edits),
  read by `CachedLatents` with the uncached draw's randomness (diffusion_cache.py);
- per record, in `edit/<split>-NNNNN.safetensors` (records [k·S, (k+1)·S), S = cache_shard_size,
  tensor names prefixed by the record's offset j in the shard):
  `j/cond/<name>`  the text conditioning of (instruction, sources), `EditEncoder.encode` of it alone
                   (Qwen: prompt_embeds (L, D) + prompt_mask (L,) of its own length L; Kontext:
                   encoder_hidden_states (512, D), pooled_projections (P,)),
  `j/null/<name>`  the same of ("", sources), the draw's null conditioning,
  `j/source_latents` (S_j, 4C) the sources' packed VAE modes (`edit.pack_sources` of one record),
  `j/source_shapes` (K_j, 2) their packed grids;
  metadata {"prompts": [...], "sources": [[key, ...], ...]} (`output_key` of each source value),
  checked at read time (a changed record is a `CacheError`).

Training (`CachedEdit`) pads a batch's rows as the live `EditConditioning` does: each item's
conditioning (its record's cond, or null where the draw drops the caption) right-padded with zeros
to the longest SELECTED row (so a Qwen batch of all-real prompts has no padding, as live), sources
zero-padded to the batch's longest with their grids; hence cached == uncached up to the storage
dtype. No text encoder, processor or VAE is loaded.

Writing is resumable and atomic as the flow cache's (cache_writer.py): each (split, shard) task
writes its edit shard, then its latent shard (both to a temp name, renamed); a task whose latent
shard exists is done, so a killed run re-encodes only unfinished shards. `index.json` is written
last, with no caption table (`captions` [], an empty `text/null.safetensors`) and the edit shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

import mmalign.modalities.cache_writer as cw
from mmalign.errors import CacheError
from mmalign.layout import batch_slots
from mmalign.modalities.diffusion import DiffusionLikelihood
from mmalign.modalities.diffusion_cache import (
    CachedLatents, LatentCache, _as_read, _record_wheres, cache_splits, open_cache, output_key, shard_name,
)
from mmalign.modalities.edit import SOURCE, EditConditioning, pack_sources, record_sources
from mmalign.modalities.loading import denoiser_config, load_parts
from mmalign.modalities.text import _prompt_text

EDIT = "edit"
EDIT_SETTINGS = {"edit_cache": 1}  # plan setting: a per-record edit cache (checked when training reads it)
NULL_FILE = shard_name("null", 0)


def edit_shard_name(split: str, k: int) -> str:
    """Relative path of the edit conditioning of records [k·S, (k+1)·S) of `split`."""
    return f"{EDIT}/{split}-{k:05d}.safetensors"


# -- writing ---------------------------------------------------------------------------------
def encode_edit_record(conditioning: EditConditioning, record: dict[str, Any], where: str) -> dict[str, Tensor]:
    """cond/<name>, null/<name> (the conditioning of (instruction, sources) and of ("", sources), each
    encoded alone: its own length), source_latents (S, 4C) and source_shapes (K, 2), on the CPU."""
    encoder = conditioning.encoder
    values = record_sources(record, where)
    if len(values) > encoder.max_sources:
        from mmalign.errors import DataError

        raise DataError(f"{where}: {len(values)} source images; this model takes at most {encoder.max_sources}")
    prepared = [encoder.prepare(conditioning.images.image(v, f"{where}, {SOURCE}", record.get("_root")))
                for v in values]
    seen = [p[0] for p in prepared]
    out: dict[str, Tensor] = {}
    for prefix, prompt in (("cond", _prompt_text(record["prompt"])), ("null", "")):
        out.update({f"{prefix}/{k}": v[0].cpu() for k, v in encoder.encode([prompt], [seen]).items()})
    latents = [encoder.source_latents(p[1][None])[0].cpu() for p in prepared]
    packed, shapes = pack_sources([latents])
    return {**out, "source_latents": packed[0], "source_shapes": shapes[0]}


def encode_edit_shard(conditioning: EditConditioning, records: Sequence[dict[str, Any]], split: str, rows: range,
                      dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every record of `rows` (`encode_edit_record`) under the name prefix of its offset in the shard;
    floating tensors in the cache dtype; metadata: the prompts and source keys."""
    tensors: dict[str, Tensor] = {}
    prompts, keys = [], []
    for j, row in enumerate(rows):
        record, where = records[row], f"{split} row {row}"
        for name, value in encode_edit_record(conditioning, record, where).items():
            tensors[f"{j}/{name}"] = cw._storage(value, dtype, where) if value.is_floating_point() else value
        prompts.append(_prompt_text(record["prompt"]))
        keys.append([output_key(v) for v in record_sources(record, where)])
    return tensors, {"prompts": json.dumps(prompts), "sources": json.dumps(keys)}


def make_edit_index(cache_dir: Path, plan: dict[str, Any], likelihood: DiffusionLikelihood) -> dict[str, Any]:
    """index.json of a complete edit cache: the plan, the latent shards with their record ranges,
    the latent shape / scaling, no caption table, and the edit shards; every file must exist."""
    size = plan["settings"]["shard_size"]
    index: dict[str, Any] = {**plan, "splits": {}, "captions": []}
    for name, split in plan["splits"].items():
        shards = [{"file": shard_name(name, k), "start": k * size, "end": min(split["num_records"], (k + 1) * size)}
                  for k in range(split["num_shards"])]
        index["splits"][name] = {**split, "shards": shards}
    shift, scale = likelihood.latents.latent_scaling()
    index["latent"] = {"shape": list(likelihood.latents.latent_shape()), "shift_factor": shift, "scaling_factor": scale}
    index["text"] = {"shard_size": size, "files": [], "null": NULL_FILE}
    index[EDIT] = {name: [edit_shard_name(name, k) for k in range(split["num_shards"])]
                   for name, split in plan["splits"].items()}
    files = [s["file"] for split in index["splits"].values() for s in split["shards"]]
    files += [f for names in index[EDIT].values() for f in names] + [NULL_FILE]
    missing = [f for f in files if not (cache_dir / f).is_file()]
    if missing:
        raise CacheError(f"{cache_dir}: {len(missing)} shard(s) missing after every process finished, "
                         f"e.g. {missing[0]}; run mmalign cache again")
    return index


def write_edit_cache(cfg: Any, likelihood: DiffusionLikelihood, rank: int = 0, world: int = 1,
                     barrier: Callable[[], None] = lambda: None, progress: bool = False) -> dict[str, Any]:
    """`cache_writer.write_cache` of an edit family (module docstring): process `rank` of `world`
    encodes tasks rank, rank + world, ...; finished shards are kept (resume); rank 0 writes the index.
    Returns this process's {"written", "reused"} tasks, "captions" (0: no caption table), "per_record"
    (True), "records", "index"."""
    cache_dir = Path(cfg.diffusion.cache_dir)
    splits = cache_splits(cfg)
    plan = cw.make_plan(cfg, splits, {**likelihood.latents.cache_settings(cfg), **EDIT_SETTINGS})
    cw.check_plan(cache_dir, plan)
    barrier()
    if rank == 0:
        cw.write_json_atomic(plan, cache_dir / "plan.json")
    settings, size = plan["settings"], plan["settings"]["shard_size"]
    dtype = getattr(torch, settings["dtype"])

    def encode(name: str, k: int) -> tuple[dict[str, Tensor], dict[str, str]]:
        records, kind = splits[name]
        rows = range(k * size, min(len(records), (k + 1) * size))
        tensors, metadata = encode_edit_shard(likelihood.conditioning, records, name, rows, dtype)
        cw.save_atomic(tensors, cache_dir / edit_shard_name(name, k), metadata)  # before its latent shard
        return cw.encode_latent_shard(likelihood, records, kind, name, rows, settings)

    tasks = [(name, k) for name, split in plan["splits"].items() for k in range(split["num_shards"])]
    written, reused = cw._run_tasks(tasks[rank::world], cache_dir, encode, "cache edits", progress)
    barrier()
    if rank == 0:
        cw.save_atomic({}, cache_dir / NULL_FILE, None)
        cw.write_json_atomic(make_edit_index(cache_dir, plan, likelihood), cache_dir / "index.json")
    barrier()
    return {"written": written, "reused": reused, "captions": 0, "per_record": True,
            "records": {name: len(records) for name, (records, _) in splits.items()},
            "index": str(cache_dir / "index.json")}


def cache_writer_for(likelihood: DiffusionLikelihood) -> Callable[..., dict[str, Any]]:
    """The `mmalign cache` writer of a likelihood: `write_edit_cache` for an edit conditioning, Wan
    image-to-video's `write_i2v_cache` (mmalign/families/_wan_i2v_cache.py), otherwise `cache_writer.write_cache`."""
    from mmalign.families._wan_i2v_cache import cache_writer_of

    if isinstance(likelihood.conditioning, EditConditioning):
        return write_edit_cache
    return cache_writer_of(likelihood) or cw.write_cache


# -- reading (training) ------------------------------------------------------------------------
def pad_rows(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-row tensors (L_i, ...) -> (n, L_max, ...) right-padded with zeros, and the lengths L_i (n,)."""
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), longest, *rows[0].shape[1:])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, torch.tensor([r.shape[0] for r in rows])


def select_rows(use_null: Tensor, cond: Tensor, null: Tensor, cond_len: Tensor, null_len: Tensor) -> Tensor:
    """Per item (N,) its null row where `use_null`, else its cond row (both (N, L, ...) zero-padded),
    cut to the longest selected length: what the live encoder gives the selected prompts batched."""
    longest = max(cond.shape[1], null.shape[1])
    pad = [0, 0] * (cond.ndim - 2)
    cond = torch.nn.functional.pad(cond, [*pad, 0, longest - cond.shape[1]])
    null = torch.nn.functional.pad(null, [*pad, 0, longest - null.shape[1]])
    mask = use_null.to(cond.device).view(-1, *[1] * (cond.ndim - 1))
    length = int(torch.where(use_null.cpu(), null_len.cpu(), cond_len.cpu()).max())
    return torch.where(mask, null, cond)[:, :length]


class CachedEdit:
    """An edit conditioning source reading each record's cached (instruction, sources) and ("", sources)
    conditioning and packed source latents (module docstring); nothing is encoded live."""

    text_encoders: list[Any] = []
    tokenizers: list[Any] = []

    def __init__(self, cache: LatentCache) -> None:
        self.cache = cache
        self._meta: dict[str, dict[str, Any]] = {}

    def to(self, device: torch.device | str) -> None:
        """Nothing frozen to move."""

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        raise CacheError("a cached edit likelihood has no text encoder: conditioning is looked up in the cache")

    def metadata(self, relative: str) -> dict[str, Any]:
        if relative not in self._meta:
            self._meta[relative] = {k: json.loads(v) for k, v in self.cache.file(relative).metadata().items()}
        return self._meta[relative]

    def read_record(self, record: dict[str, Any], kind: str, where: str) -> dict[str, Tensor]:
        """A record's cached tensors (`encode_edit_record`'s names), float32; found by its outputs
        (`LatentCache.locate`) and checked against its prompt and source keys."""
        split, shard, row = self.cache.locate(record, kind, where)[0]
        offset = row // self.cache.index["splits"][split]["items_per_record"]
        relative = self.cache.index[EDIT][split][shard]
        meta = self.metadata(relative)
        keys = [output_key(v) for v in record_sources(record, where)]
        if meta["prompts"][offset] != _prompt_text(record["prompt"]) or meta["sources"][offset] != keys:
            raise CacheError(f"{where}: its prompt or source image(s) differ from the cache {self.cache.dir} (the data "
                             "changed since `mmalign cache`?); rerun mmalign cache with an empty diffusion.cache_dir")
        f, prefix = self.cache.file(relative), f"{offset}/"
        return {k[len(prefix):]: _as_read(f.get_tensor(k)) for k in f.keys() if k.startswith(prefix)}

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """Per item (flatten order): edit/cond/<name>, edit/null/<name> (N, L_max, ...) zero-padded with
        edit/cond_length/<name>, edit/null_length/<name> (N,); source_latents (N, S_max, 4C) and
        source_shapes (N, K_max, 2) (`pack_sources`'s padding)."""
        per_record = [self.read_record(r, kind, w) for r, w in zip(records, _record_wheres(records))]
        items = [per_record[i] for i, _ in batch_slots(records, kind)]
        out: dict[str, Tensor] = {}
        for name in items[0]:
            if name.startswith(("cond/", "null/")):
                prefix, key = name.split("/", 1)
                out[f"edit/{prefix}/{key}"], out[f"edit/{prefix}_length/{key}"] = pad_rows([it[name] for it in items])
        out["source_latents"] = pad_rows([it["source_latents"] for it in items])[0]
        out["source_shapes"] = pad_rows([it["source_shapes"] for it in items])[0]
        return out

    def per_item(self, inputs: dict[str, Any], groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        """Each item's conditioning: its record's null rows where its group's caption is `dropped`
        (G,), else its cond rows (`select_rows`); the source latents and grids as collated."""
        use_null = dropped[groups]
        out = {}
        for key in [k for k in inputs if k.startswith("edit/cond/")]:
            name = key[len("edit/cond/"):]
            out[name] = select_rows(use_null, inputs[key], inputs[f"edit/null/{name}"],
                                    inputs[f"edit/cond_length/{name}"], inputs[f"edit/null_length/{name}"])
        return {**out, "source_latents": inputs["source_latents"], "source_shapes": inputs["source_shapes"]}


def build_edit_cached(cfg: Any, family: Any, denoiser: Any, trained: bool,
                      objective: Callable[[Any, tuple[int, int, int]], Any]) -> tuple[Any, DiffusionLikelihood, None]:
    """(denoiser, edit likelihood reading `diffusion.cache_dir`, None): only the denoiser (when trained)
    and the scheduler are loaded (no VAE, text encoder or processor); the cache is checked against the
    config, the data and the denoiser's latent channels (`open_cache`)."""
    parts = load_parts(cfg, family, unet=trained, frozen=False)
    cache = open_cache(cfg, family, denoiser.latent_channels(denoiser_config(cfg, family)), EDIT_SETTINGS)
    d = cfg.diffusion
    chosen = objective(parts["scheduler"], tuple(cache.index["latent"]["shape"]))
    likelihood = DiffusionLikelihood(family, chosen, CachedLatents(cache, d), CachedEdit(cache), denoiser, d)
    return parts["unet"], likelihood, None
