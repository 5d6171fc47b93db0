"""One round's sampling split across processes (issue 15, item 2).

The round's N rows are cut into global batches of `online.sample_batch_size` rows in row order;
batch b is sampled by process b mod W (W processes). A row's output is a function of its seed,
its batch (the same global batch for every W) and the weights, never of which process drew it,
so W processes give exactly what one gives. Each process returns (row index, output) pairs,
`accelerate.utils.gather_object` concatenates them on every process, and they are put back in
row order. Media are written by the process that sampled them (atomically, under the round
folder, which all processes share: the run's output_dir, as for checkpoints).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch

from mmalign.online.samplers import Sampler, SampleJob, SamplerContext


def job_slice(job: SampleJob, part: slice) -> SampleJob:
    """Rows `part` of a job: every per-row list field sliced, the rest (the folder) kept."""
    return replace(job, **{f.name: getattr(job, f.name)[part] for f in fields(job)
                           if isinstance(getattr(job, f.name), list)})


def my_batches(num_rows: int, batch_size: int, rank: int, world: int) -> list[slice]:
    """The global batches [b * size, (b + 1) * size) with b mod world == rank."""
    starts = range(0, num_rows, batch_size)
    return [slice(s, min(s + batch_size, num_rows)) for b, s in enumerate(starts) if b % world == rank]


def sample_shards(sampler: Sampler, ctx: SamplerContext, model: torch.nn.Module, job: SampleJob,
                  accelerator: Any) -> list[dict[str, Any]]:
    """The job's N outputs in row order, each process sampling its global batches (module docstring)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine: list[tuple[int, dict[str, Any]]] = []
    for part in my_batches(len(job.prompts), ctx.batch_size, rank, world):
        outputs = sampler(ctx, model, job_slice(job, part))
        mine.extend(zip(range(part.start, part.stop), outputs, strict=True))
    if world > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    ordered = sorted(mine, key=lambda pair: pair[0])
    if [i for i, _ in ordered] != list(range(len(job.prompts))):
        raise RuntimeError(f"online round: gathered outputs of rows {[i for i, _ in ordered]}, expected "
                           f"0..{len(job.prompts) - 1}")
    return [out for _, out in ordered]
