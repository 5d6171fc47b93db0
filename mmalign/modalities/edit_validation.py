"""Validation grids of the edit families (`train.validate_every` with `qwen_image_edit`,
`qwen_image_edit_plus`, `flux_kontext`): an edit needs a source image, so the grid's rows are the
first N training records (N = the number of `diffusion.validation_prompts`), each its instruction
about its own source(s), and its columns the `diffusion.validation_seeds`.

Each image is one call of the family's edit pipeline (QwenImageEditPipeline, QwenImageEditPlusPipeline,
FluxKontextPipeline) built in memory from the policy transformer and the likelihood's frozen parts
(`validation.sampling_pipeline`, plus the encoder's `pipeline_parts`: Qwen's processor), with
prompt = the instruction, the sources as `EditEncoder.pipeline_inputs` feeds them (Kontext: sized as
training, `_auto_resize` off, max_area = resolution²; the Qwen pipelines size sources to their own
fixed areas, 1024² (and 384² for Plus's VL images), as in `mmalign generate`), height = width =
resolution, guidance as the
other flow families (`validation.guidance_arguments`: true CFG with the empty negative prompt for
Qwen) and a CPU generator seeded with the column's seed: the same weights give the same pixels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from mmalign.io import atomic_path
from mmalign.modalities.edit import record_sources
from mmalign.modalities.text import _prompt_text
from mmalign.nn import eval_mode


def validation_records(cfg: Any) -> list[dict[str, Any]]:
    """The first len(diffusion.validation_prompts) training records when `train.validate_every` is
    on (read as the trainer reads them), else []."""
    if not cfg.train.validate_every:
        return []
    from mmalign.data.preference import load_run_split

    records, _ = load_run_split(cfg, "train")
    return [dict(records[i]) for i in range(min(len(cfg.diffusion.validation_prompts), len(records)))]


@torch.no_grad()
def sample_edits(pipe: Any, conditioning: Any, records: Sequence[dict[str, Any]], seeds: Sequence[int], steps: int,
                 guidance: dict[str, Any], resolution: int) -> torch.Tensor:
    """(len(records) · len(seeds), 3, res, res) float32 in [0, 1]: per record, one edit of its sources
    per seed (one pipeline call each, module docstring)."""
    images = []
    for row, record in enumerate(records):
        where = f"validation record {record.get('_index', row)}"
        sources = [conditioning.images.image(v, where, record.get("_root")) for v in record_sources(record, where)]
        inputs = conditioning.encoder.pipeline_inputs(sources)
        for seed in seeds:
            pixels = pipe(prompt=_prompt_text(record["prompt"]), generator=torch.Generator().manual_seed(int(seed)),
                          num_inference_steps=steps, **guidance, **inputs, height=resolution, width=resolution,
                          output_type="pt", return_dict=False)[0]
            images.append(pixels.float().cpu())
    return torch.cat(images)


def validate_edits(likelihood: Any, unet: torch.nn.Module, step: int, folder: str | Path, seeds: Sequence[int],
                   steps: int, guidance: float) -> dict[str, float]:
    """Edit the validation records' sources (`EditConditioning.validation`) with the current `unet`
    (eval mode) and write `folder/grid.png` (rows: records, columns: seeds) and `folder/grid.json`.
    Returns {"validation/images": n, "validation/seconds": s}."""
    from mmalign.modalities.validation import guidance_arguments, image_grid, sampling_pipeline

    conditioning = likelihood.conditioning
    records = conditioning.validation
    if not records or not seeds:
        raise ValueError("edit validation needs at least one training record and one seed (diffusion.validation_seeds)")
    tic = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    resolution = likelihood.settings.resolution
    with eval_mode(unet):
        pipe = sampling_pipeline(likelihood, unet, **conditioning.encoder.pipeline_parts())
        images = sample_edits(pipe, conditioning, records, seeds, steps,
                              guidance_arguments(likelihood.family, guidance), resolution)
    with atomic_path(folder / "grid.png") as tmp:
        image_grid(images, len(seeds)).save(tmp, format="PNG")
    layout = {"step": step, "rows": [_prompt_text(r["prompt"]) for r in records],
              "sources": [[str(v) for v in record_sources(r, "validation")] for r in records],
              "columns": [int(s) for s in seeds], "steps": steps, "guidance": guidance, "resolution": resolution}
    with atomic_path(folder / "grid.json") as tmp:
        tmp.write_text(json.dumps(layout, indent=2))
    return {"validation/images": float(images.shape[0]), "validation/seconds": time.perf_counter() - tic}
