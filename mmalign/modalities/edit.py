"""Image-editing conditioning shared by the edit families (`qwen_image_edit`, `flux_kontext`): the
prompt is an instruction about one or more source images, and the likelihood of an edited image x0
is the flow-matching one of its family (mmalign/modalities/flow.py) with the source in the
condition, as the family's edit pipeline feeds it:

    c = (encode(instruction [, source images]), z_src),  z_src = packed VAE mode of each source,
    v_θ(x_t, σ, c) = transformer([pack(x_t); z_src], ...)[:, :T]   (T = the target's tokens)
    logp = -0.5 · mean((v_θ - pack(ε - x0))²)

Records: {"source_image": image, "prompt": instruction, "chosen": image, "rejected": image} (or
"source_images": [image, ...] for multi-source models); the targets go through the family's latent
source (resize + crop to `diffusion.resolution`), each source image through the family's own resize
rule (`EditEncoder.prepare`: the pipeline's, with its pixel area scaled to resolution²).

The source latents are the VAE posterior MODE (the pipelines' `retrieve_latents(...,
sample_mode="argmax")`), so they are deterministic; a pair's chosen and rejected items share the
record's sources. Dropped captions become the empty instruction about the SAME sources (the edit
pipelines' negative prompt is encoded with the image). Sources of several sizes in one batch are
carried zero-padded with their packed grid sizes (`source_shapes`); the denoiser calls the
transformer once per distinct size (`rows_by_shape`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from mmalign.data.preference import flatten
from mmalign.modalities.flow import pack_latents
from mmalign.modalities.text import LiveEncoders, _prompt_text

SOURCE, SOURCES = "source_image", "source_images"


def check_edit_settings(cfg: Any, name: str) -> None:
    """An edit family trains on unflipped pairs: `diffusion.random_flip` is a ConfigError (the cache,
    `diffusion.cache_dir`, is per record: mmalign/modalities/edit_cache.py)."""
    from mmalign.errors import ConfigError

    if cfg.diffusion.random_flip:
        raise ConfigError(f"diffusion.random_flip would mirror the edited image and not its source (modality "
                          f"'{name}'); set it false")


def record_sources(item: dict[str, Any], where: str) -> list[Any]:
    """The source image values of a record: [source_image] or source_images (a non-empty list); a
    record with neither is a DataError naming `where`."""
    from mmalign.errors import DataError

    if SOURCES in item:
        values = item[SOURCES]
        if not isinstance(values, list) or not values:
            raise DataError(f"{where}: '{SOURCES}' must be a non-empty list of images")
        return values
    if SOURCE in item:
        return [item[SOURCE]]
    raise DataError(f"{where}: an edit record needs '{SOURCE}' (or '{SOURCES}'), the image the prompt edits")


class EditEncoder(Protocol):
    """A family's live edit conditioning (e.g. `families.qwen_image_edit.QwenEditText`)."""

    text_encoders: list[Any]
    tokenizers: list[Any]
    max_sources: int

    def prepare(self, image: Any) -> tuple[Any, Tensor]:
        """(the image the text encoder reads (a PIL image, or None), pixels (3, h, w) in [-1, 1]
        for the VAE), each resized as the pipeline resizes a source image."""
        ...

    def encode(self, prompts: list[str], images: list[list[Any]]) -> dict[str, Tensor]:
        """The text conditioning (n, ...) float32 of each prompt about its images, as the pipeline's
        `encode_prompt`."""
        ...

    def source_latents(self, pixels: Tensor) -> Tensor:
        """Latents (n, C, h, w) float32 of source pixels (n, 3, H, W), as the pipeline's
        `_encode_vae_image` (the posterior mode, normalised)."""
        ...

    def pipeline_parts(self) -> dict[str, Any]:
        """The edit pipeline's constructor arguments beyond the VAE, scheduler, denoiser and text
        encoders (Qwen: its processor): validation builds the pipeline in memory."""
        ...

    def pipeline_inputs(self, images: list[Any]) -> dict[str, Any]:
        """The edit pipeline's `__call__` arguments that feed it a record's source images (loaded PIL)
        so that it conditions on them as training does (validation grids)."""
        ...


def pack_sources(latents: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
    """Per item, its sources' latents [(C, h_k, w_k), ...] -> packed (n, S_max, 4C) (each item's
    sources packed 2×2 and concatenated along the sequence, zero-padded to the longest) and
    source_shapes (n, K_max, 2) long, the packed grid (h_k/2, w_k/2) of each (zeros: no source)."""
    packed = [torch.cat([pack_latents(z[None])[0] for z in zs]) for zs in latents]
    k_max, s_max = max(len(zs) for zs in latents), max(p.shape[0] for p in packed)
    out = packed[0].new_zeros(len(packed), s_max, packed[0].shape[1])
    shapes = torch.zeros(len(packed), k_max, 2, dtype=torch.long)
    for i, (p, zs) in enumerate(zip(packed, latents)):
        out[i, : p.shape[0]] = p
        shapes[i, : len(zs)] = torch.tensor([[z.shape[1] // 2, z.shape[2] // 2] for z in zs])
    return out, shapes


def rows_by_shape(shapes: Tensor) -> list[tuple[Tensor, list[tuple[int, int]], int]]:
    """Items grouped by their sources' packed grids (n, K, 2): [(rows, [(h/2, w/2), ...], S)], S the
    grid's token count, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for row, shape in enumerate(shapes.tolist()):
        groups.setdefault(tuple(map(tuple, shape)), []).append(row)
    out = []
    for key, rows in groups.items():
        grids = [(a, b) for a, b in key if a > 0]
        out.append((torch.tensor(rows), grids, sum(a * b for a, b in grids)))
    return out


class EditConditioning(LiveEncoders):
    """Live edit conditioning (module docstring): collate loads each item's sources and resizes them
    (`EditEncoder.prepare`); the draw encodes each group's instruction with its images once (the
    empty instruction where the caption is dropped) and its sources' latents.

    images: the likelihood's latent source, whose `image(value, where, root)` loads a record's image;
    validation: the records whose sources and instructions the validation grid edits (edit_validation.py)."""

    def __init__(self, encoder: EditEncoder, images: Any, validation: list[dict[str, Any]] | None = None) -> None:
        super().__init__(encoder)
        self.images, self.validation = images, list(validation or [])

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        """edit_prompts: N instructions; edit_images: per item, the text encoder's images; edit_pixels:
        per item, its sources' pixels (3, h, w) (lists: sources may differ in size)."""
        prompts, seen, pixels = [], [], []
        for item in flatten(records, kind):
            where = f"row {item.get('_index', '?')}"
            values = record_sources(item, where)
            if len(values) > self.encoder.max_sources:
                from mmalign.errors import DataError

                raise DataError(f"{where}: {len(values)} source images; this model takes at most "
                                f"{self.encoder.max_sources}")
            prepared = [self.encoder.prepare(self.images.image(v, f"{where}, {SOURCE}", item.get("_root")))
                        for v in values]
            prompts.append(_prompt_text(item["prompt"]))
            seen.append([p[0] for p in prepared])
            pixels.append([p[1] for p in prepared])
        return {"edit_prompts": prompts, "edit_images": seen, "edit_pixels": pixels}

    def encode_edit(self, prompts: list[str], images: list[list[Any]], pixels: list[list[Tensor]]) -> dict[str, Tensor]:
        """The conditioning (n, ...) of n instructions about their sources: the encoder's text
        conditioning, source_latents (n, S, 4C) and source_shapes (n, K, 2) (`pack_sources`)."""
        cond = self.encoder.encode(prompts, images)
        latents = [[self.encoder.source_latents(p[None])[0] for p in item] for item in pixels]
        packed, shapes = pack_sources(latents)
        device = next(iter(cond.values())).device
        return {**cond, "source_latents": packed.to(device), "source_shapes": shapes.to(device)}

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        from mmalign.errors import ConfigError

        raise ConfigError("an edit model's prompt needs its source image(s): no text-only conditioning")

    def per_item(self, inputs: dict[str, Any], groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        """Each group's (first item's) instruction, "" where `dropped` (G,), encoded with its sources
        once; returns per-item (N, ...) tensors."""
        first = (groups[None, :] == torch.arange(int(groups.max()) + 1)[:, None]).int().argmax(1).tolist()
        prompts = ["" if bool(dropped[g]) else inputs["edit_prompts"][i] for g, i in enumerate(first)]
        cond = self.encode_edit(prompts, [inputs["edit_images"][i] for i in first],
                                [inputs["edit_pixels"][i] for i in first])
        return {k: v[groups.to(v.device)] for k, v in cond.items()}
