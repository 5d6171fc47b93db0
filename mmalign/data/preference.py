"""Preference records on disk -> validated Python records -> flat items for a Likelihood.

Formats (one record per example):
- pair:     {"prompt", "chosen", "rejected"} (+ optional "weight", "soft_label")
- unpaired: {"prompt", "completion", "label"}   (KTO; label true = desirable)
- ranked:   {"prompt", "completions": [...], "scores": [...]}  (RankDPO lists)
- rewarded: {"prompt", "completion", "optimality"} (+ "reward", "advantage")  (DiffusionNFT samples
            of an online `rewards` round; optimality r in [0, 1])

Files: `.jsonl`, `.json` (a list), `.parquet`, or a Hugging Face `datasets` folder
written by `save_to_disk`. A prompt may be a string or a list of chat messages
(`[{"role": "user", "content": ...}]`); an answer may be a string or a one-message list,
or media for image/audio models: a file path, raw bytes, or {"bytes", "path"}.
"""

from __future__ import annotations

import bisect
import importlib
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.data.jsonl import read_json, read_jsonl_rows
from mmalign.errors import DataError  # defined in mmalign.errors; still importable from here
from mmalign.layout import check_kind, item_slots, record_outputs
from mmalign.seeds import RUN, mix_seed
from mmalign.types import PreferenceBatch


REQUIRED = {
    "pair": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "ranked": ("prompt", "completions", "scores"),
    "rewarded": ("prompt", "completion", "optimality"),
}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read all records of a jsonl / json / parquet file or a `datasets` folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"preference data not found: {path}")
    if path.is_dir():
        import datasets  # a folder written by Dataset.save_to_disk

        return [dict(r) for r in datasets.load_from_disk(str(path))]
    if path.suffix == ".jsonl":
        return read_jsonl_rows(path)
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: row {bad} is not a JSON object")
        return data
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported format (use .jsonl, .json, .parquet or a datasets folder)")


def infer_kind(record: dict[str, Any], source: str = "data") -> str:
    if "chosen" in record or "rejected" in record:
        return "pair"
    if "completions" in record:
        return "ranked"
    if "completion" in record:
        return "unpaired"
    raise DataError(
        f"{source}: cannot tell the record format from its keys {sorted(record)}: expected "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in REQUIRED.items())
    )


def _value_ok(value: Any) -> bool:
    """A usable prompt or output: text, chat messages, or media (bytes, or a
    {"bytes": ..., "path": ...} dict as Hugging Face's Image/Audio features store it)."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (bytes, bytearray)):
        return len(value) > 0
    if isinstance(value, dict):
        return bool(value.get("bytes")) or bool(value.get("path"))
    if isinstance(value, list):  # chat messages
        return bool(value) and all(isinstance(m, dict) and str(m.get("content", "")).strip() for m in value)
    return False


def validate_records(records: list[dict[str, Any]], source: str, kind: str | None = None) -> str:
    """Check every record; raise a `DataError` naming the first bad row. Returns the kind."""
    if not records:
        raise DataError(f"{source}: no records")
    kind = kind or infer_kind(records[0], source)
    for i, r in enumerate(records):
        missing = [c for c in REQUIRED[kind] if c not in r]
        if missing:
            raise DataError(f"{source}: row {i} has no column {', '.join(map(repr, missing))} (format '{kind}')")
        texts = [r["prompt"]] + (
            [r["chosen"], r["rejected"]] if kind == "pair"
            else [r["completion"]] if kind in ("unpaired", "rewarded") else list(r["completions"])
        )
        if not all(_value_ok(t) for t in texts):
            raise DataError(f"{source}: row {i} has an empty prompt or answer")
        if kind == "ranked" and len(r["completions"]) != len(r["scores"]):
            raise DataError(f"{source}: row {i} has {len(r['completions'])} completions but {len(r['scores'])} scores")
        if kind == "ranked" and len(r["completions"]) != len(records[0]["completions"]):
            raise DataError(f"{source}: row {i}: every ranked list must have the same length K")
        numbers = [r.get("weight", 1.0), r.get("soft_label", 0.5)] + list(r.get("scores", []))
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            raise DataError(f"{source}: row {i} has a weight, soft_label or score that is not a finite number")
        if r.get("weight", 1.0) < 0:
            raise DataError(f"{source}: row {i}: weight must be >= 0, got {r['weight']}")
        if "soft_label" in r and not 0.0 <= r["soft_label"] <= 1.0:
            raise DataError(f"{source}: row {i}: soft_label must be in [0, 1], got {r['soft_label']}")
    return kind


# Dataset-specific readers (data.format): each returns (records, kind), where records is a
# list or a lazy sequence (len + indexing) of records in the formats above, validated by
# the reader itself (a lazy reader must not read every row up front).
FORMATS = {
    "pickapic": "mmalign.data.pickapic:load_pickapic",
    "rlhf_v": "mmalign.data.vlm_formats:load_rlhf_v",
    "rlaif_v": "mmalign.data.vlm_formats:load_rlaif_v",
    "povid": "mmalign.data.vlm_formats:load_povid",
    "mdpo": "mmalign.data.vlm_formats:load_mdpo",
    "trl_vlm": "mmalign.data.vlm_formats:load_trl_vlm",
    "audio_alpaca": "mmalign.data.audio:load_audio_alpaca",  # Tango 2's Audio-Alpaca parquet
    "audio_pairs": "mmalign.data.audio:load_audio_pairs",  # {"prompt", "chosen", "rejected"} with audio
}


def load_preference_data(path: str | Path | Sequence[str | Path], kind: str | None = None,
                         format: str = "auto", streaming: int = 0) -> tuple[Sequence[dict[str, Any]], str]:
    """Read and validate preference data; returns (records, kind). A list of paths is read
    in order as one dataset: every file of the same format and kind. A path may also be
    `pkg://...` or a Hub dataset id `org/name[@rev][:split]` (mmalign/data/hub_data.py; streaming:
    `data.streaming`, the rows kept from a streamed split, 0 = the whole split)."""
    from mmalign.data.hub_data import hub_data_id, load_hub_data, local_data_path

    if not isinstance(path, (str, Path)):
        parts, kind = _load_parts(path, kind, format, streaming)
        return Chained(parts), kind
    spec = hub_data_id(path)
    if spec is not None:
        return load_hub_data(str(path), spec, kind, format, streaming)
    path = local_data_path(path)
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"unknown data.format '{format}'; known: auto, {', '.join(FORMATS)}")
        module, name = FORMATS[format].split(":")
        return getattr(importlib.import_module(module), name)(path)
    records = read_records(path)
    return records, validate_records(records, str(path), kind)


def _load_parts(paths: Sequence[str | Path], kind: str | None, format: str, streaming: int = 0
                ) -> tuple[list[Sequence[dict[str, Any]]], str]:
    if not paths:
        raise DataError("no preference data files given (an empty list)")
    parts = [load_preference_data(p, kind, format, streaming) for p in paths]
    kinds = {k for _, k in parts}
    if len(kinds) > 1:
        named = ", ".join(f"{p}: {k}" for p, (_, k) in zip(paths, parts))
        raise DataError(f"preference data files hold different kinds of records ({named})")
    return [r for r, _ in parts], parts[0][1]


def load_split(path: str | Path | Sequence[str | Path], kind: str | None = None,
               format: str = "auto", media: Any = None, streaming: int = 0) -> tuple[Sequence[dict[str, Any]], str]:
    """`data.train` or `data.eval` as the trainer reads it: `load_preference_data`, each record
    also carrying `_root`, the folder its relative media paths name files in (its data file's
    folder; a `datasets` folder is its own), so train and eval files in two folders may both
    say images/0.png. media: a `mmalign.data.media_checks.MediaPolicy` (paths kept inside the
    data folder, images verified up front), None = no checks."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    parts, kind = _load_parts(paths, kind, format, streaming)
    roots = [data_folder(p) for p in paths]
    if media is not None:
        from mmalign.data.media_checks import guard_parts

        parts = guard_parts(parts, paths, roots, kind, media)
    return Chained(parts, [str(r) for r in roots]), kind


def load_run_split(cfg: Any, split: str, kind: str | None = None) -> tuple[Sequence[dict[str, Any]], str]:
    """`load_split` of `cfg.data.<split>` ("train" or "eval") under the run's media policy
    (`data.verify_media`, `data.allow_outside_paths`): what the trainer and `mmalign cache` read."""
    from mmalign.data.media_checks import media_policy

    return load_split(getattr(cfg.data, split), kind, cfg.data.format, media_policy(cfg), cfg.data.streaming)


def data_folder(path: str | Path) -> Path:
    """The folder relative media paths of a data file are read from: the file's folder, or a
    `datasets` folder itself (a Hub dataset id: its records carry their media as bytes)."""
    from mmalign.data.hub_data import local_data_path

    p = Path(local_data_path(path))
    return p if p.is_dir() else p.parent


class Chained(Sequence):
    """Several record sequences (lists or lazy readers) read as one, without copying them;
    with `roots`, each record read comes with `_root` set to its part's folder."""

    def __init__(self, parts: list[Sequence[dict[str, Any]]], roots: list[str] | None = None) -> None:
        self.parts, self.roots = parts, roots
        self.starts = list(itertools.accumulate((len(p) for p in parts), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = bisect.bisect_right(self.starts, i) - 1
        record = self.parts[part][i - self.starts[part]]
        return record if self.roots is None else dict(record, _root=self.roots[part])


def flatten(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """One item per scored output: pairs give chosen items then rejected items (2B),
    ranked lists give K items per list (list-major), unpaired records one item each.
    Each item is the record with `response` set to the output it scores."""
    check_kind(kind)
    outputs = [record_outputs(r, kind) for r in records]
    return [dict(records[i], response=outputs[i][j]) for i, j in item_slots(kind, [len(o) for o in outputs])]


def mismatched(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's KL items: each prompt with the NEXT record's completion (cyclic), as TRL
    builds them to estimate the reference point z on answers that do not fit the prompt."""
    n = len(records)
    return [dict(r, completion=records[(i + 1) % n]["completion"]) for i, r in enumerate(records)]


def batch_fields(records: list[dict[str, Any]], kind: str, inputs: dict[str, Any]) -> PreferenceBatch:
    """Attach the per-example fields (index, weights, soft labels, labels, scores, cached
    reference log-likelihoods) to the model inputs a Likelihood has built."""
    def col(name: str, default: float) -> Tensor:
        return torch.tensor([float(r.get(name, default)) for r in records])

    has = lambda name: any(name in r for r in records)  # noqa: E731
    ref = None
    if any("_ref_logps" in r for r in records):
        refs = [r["_ref_logps"] for r in records]
        ref = torch.tensor([refs[i][j] for i, j in item_slots(kind, [len(x) for x in refs])])
    return PreferenceBatch(
        kind=kind,
        inputs=inputs,
        index=torch.tensor([int(r.get("_index", i)) for i, r in enumerate(records)]),
        weights=col("weight", 1.0) if has("weight") else None,
        soft_labels=col("soft_label", 1.0) if has("soft_label") else None,
        desirable=torch.tensor([bool(r["label"]) for r in records]) if kind == "unpaired" else None,
        scores=torch.tensor([list(map(float, r["scores"])) for r in records]) if kind == "ranked" else None,
        ref_logps=ref,
        advantages=col("advantage", 0.0) if kind == "step" else None,
        old_logps=col("old_logp", 0.0) if kind == "step" else None,
        optimality=col("optimality", 0.5) if kind == "rewarded" else None,
    )


class StreamSampler:
    """Deterministic example order shared by every process.

    The stream is the concatenation of seeded permutations of the dataset (one per
    epoch). Micro-step m of the whole run consumes the next `batch_size * world_size`
    stream entries and process r takes its contiguous slice. Each example is seen
    exactly once per epoch (nothing duplicated or dropped across processes), and the
    position is a pure function of the micro-step, so resuming — even with another
    process count, as long as the global batch is the same — reads the same examples.
    """

    def __init__(self, num_examples: int, seed: int) -> None:
        if num_examples < 1:
            raise DataError("cannot sample from an empty dataset")
        self.n = num_examples
        self.seed = seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, strides=(RUN, 1), wrap=False))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def epoch_order(self, epoch: int) -> Tensor:
        """(N,) the record order of epoch `epoch` (the seeded permutation π_epoch)."""
        return self._perm(epoch)

    def indices(self, start: int, count: int) -> list[int]:
        """Stream entries [start, start + count)."""
        out = []
        for pos in range(start, start + count):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out

    def micro_batch(self, micro_step: int, batch_size: int, rank: int, world_size: int) -> list[int]:
        start = micro_step * batch_size * world_size + rank * batch_size
        return self.indices(start, batch_size)
