"""Text conditioning stored at each prompt's real length in the diffusion cache (`mmalign cache`).

Long-prompt families pad their conditioning to a fixed length with ZEROS past each prompt's real
tokens (Wan: UMT5 states (n, 512, 4096), zeros past the prompt, as WanPipeline feeds them;
Qwen-Image: (n, 512, 3584) + a bool mask, zeros / False past the prompt; Z-Image: the Qwen3 states
zeroed past the mask, which its call never reads). Their prompt encoder
subclasses `PaddedText`, naming those tensors and giving each row's real length ℓ_i; the cache then
stores, per padded tensor x (n, W, ...):

    ragged/<name>   (Σ ℓ_i, ...)   the rows x[i, :ℓ_i] one after another (no padding on disk)
    offsets/<name>  (n + 1,) int64  row i is ragged[offsets[i] : offsets[i + 1]]
    width/<name>    (1,) int64      W, the padded length

and the reader rebuilds x[i] = [ragged rows, zeros up to W]: the tensor the live encoder gives,
exactly (the padding was zeros), so cached training feeds the denoiser what uncached training does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

RAGGED, OFFSETS, WIDTH = "ragged/", "offsets/", "width/"


class PaddedText:
    """Base of a prompt encoder whose tensors `padded` (n, W, ...) are zeros past row i's first
    `real_lengths(ids, cond)[i]` positions along dim 1 (module docstring)."""

    padded: tuple[str, ...] = ()

    def real_lengths(self, ids: dict[str, Tensor], cond: dict[str, Tensor]) -> Tensor:
        """(n,) long: each row's real length ℓ_i <= W of the `padded` tensors."""
        raise NotImplementedError


def prefix_lengths(mask: Tensor) -> Tensor:
    """(n,) long of a mask (n, W): row i's count of real tokens when they come first (right padding),
    else W (a left-padded row is stored whole: correct, only not smaller)."""
    mask = mask.bool()
    count = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < count[:, None]
    return torch.where(prefix.eq(mask).all(dim=1), count, torch.full_like(count, mask.shape[1]))


def pack(cond: dict[str, Tensor], names: tuple[str, ...], lengths: Tensor) -> dict[str, Tensor]:
    """`cond` with each tensor of `names` (n, W, ...) replaced by ragged/, offsets/ and width/
    (module docstring); a non-zero value past a row's length is a ValueError (it would be lost)."""
    out = {k: v for k, v in cond.items() if k not in names}
    lengths = lengths.long().cpu()
    for name in names:
        value = cond[name].cpu()
        past = torch.arange(value.shape[1])[None, :] >= lengths[:, None]  # (n, W)
        if bool(value[past].ne(0).any()):
            raise ValueError(f"the conditioning tensor {name} is not zero past each prompt's real length")
        out[RAGGED + name] = torch.cat([value[i, :length] for i, length in enumerate(lengths.tolist())])
        out[OFFSETS + name] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        out[WIDTH + name] = torch.tensor([value.shape[1]], dtype=torch.long)
    return out


def merge(packs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Chunks of `pack` (or of plain (n, ...) tensors) as one table: rows concatenated, offsets rebased."""
    out: dict[str, Tensor] = {}
    for key in packs[0]:
        if key.startswith(WIDTH):
            out[key] = packs[0][key]
        elif key.startswith(OFFSETS):
            lengths = torch.cat([p[key].diff() for p in packs])
            out[key] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        else:
            out[key] = torch.cat([p[key] for p in packs])
    return out


def read_row(get: Any, names: list[str], row: int) -> dict[str, Tensor]:
    """Row `row` of a stored text table as (1, ...) tensors, padded ones rebuilt to (1, W, ...);
    get(name) -> a sliceable stored tensor (a safetensors slice, or a tensor)."""
    out = {}
    for name in names:
        if name.startswith((OFFSETS, WIDTH)):
            continue
        if not name.startswith(RAGGED):
            out[name] = get(name)[row : row + 1]
            continue
        base = name[len(RAGGED):]
        start, end = get(OFFSETS + base)[row : row + 2].tolist()
        rows = get(name)[start:end]
        value = rows.new_zeros((1, int(get(WIDTH + base)[0:1].item()), *rows.shape[1:]))
        value[0, : end - start] = rows
        out[base] = value
    return out


def unpack(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A whole stored table (the null prompt's) as (n, ...) tensors, padded ones rebuilt."""
    names = list(tensors)
    n = next((len(v) - 1 for k, v in tensors.items() if k.startswith(OFFSETS)), None)
    if n is None:
        return dict(tensors)
    rows = [read_row(tensors.__getitem__, names, i) for i in range(n)]
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
