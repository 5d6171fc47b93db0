"""One online round as data: its samples (manifest rows), their scores, the records the strategy
builds from them, and the round folder that keeps them (output_dir/rounds/round_NNNNN/).

Rows have the `mmalign generate` manifest shape ({"id", "prompt_index", "prompt", "sample",
"seed", "kind", "text" | "path"}) so the offline tools apply unchanged: `score_rows` /
`combine_rows` (mmalign/scoring/manifest.py) fill `score_<column>` and `score`, and
`build_scored_pairs` + `item_record` (mmalign/builders/scores.py) select and write the records.
`prompt_index` is the prompt's slot in the round (0..P-1), so a prompt drawn twice in one round
forms two groups.

Strategy `rewards` (DiffusionNFT) keeps every sample as one "rewarded" record with its group
advantage instead of pairs (`online/rewards.py`).

Folder: media/ (image samples), samples.jsonl (scored rows), records.jsonl (training records,
media paths relative to the folder), meta.json (fingerprint, counts; written last: a round
without it is incomplete and is sampled again).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmalign.data.jsonl import read_jsonl_rows
from mmalign.errors import ConfigError, DataError
from mmalign.io import atomic_path, write_jsonl_atomic
from mmalign.seeds import ROW, RUN, STEP, mix_seed

SEED_OFFSET = 15  # keeps sample seeds apart from the trainer's step seeds (same strides)


def sample_seed(seed: int, round_index: int, slot: int, sample: int) -> int:
    """The seed of sample `sample` of prompt slot `slot` of round `round_index` (a function of
    the run's seed and these counters only)."""
    return mix_seed(seed, round_index, slot, sample, strides=(RUN, ROW, STEP, 1), offset=SEED_OFFSET)


def plan_rows(prompts: list[str], group_size: int, seed: int, round_index: int,
              fields: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The round's P * group_size rows without outputs, prompt-major: id r<round>-p<slot>-s<j>;
    fields[slot]: the prompt's own fields (a VLM prompt's images and objects) copied into its rows."""
    fields = fields or [{} for _ in prompts]
    return [{"id": f"r{round_index:05d}-p{slot:03d}-s{j:02d}", "prompt_index": slot, "prompt": prompt,
             "sample": j, "seed": sample_seed(seed, round_index, slot, j), **fields[slot]}
            for slot, prompt in enumerate(prompts) for j in range(group_size)]


def load_scorers(specs: list[str], kind: str, device: str, key: str = "online.scorer") -> list[tuple[Any, Any]]:
    """(ScorerSpec, scorer) per spec of `key` (online.scorer, online.eval_scorer); a scorer that
    cannot score `kind` samples is a ConfigError naming it."""
    from mmalign.scoring import load_scorer, parse_spec, scorer_class

    loaded = []
    for spec in map(parse_spec, specs):
        kinds = scorer_class(spec.name).kinds
        if kind not in kinds:
            raise ConfigError(f"{key} '{spec.name}' scores {'/'.join(kinds)} samples; this modality "
                              f"samples {kind}")
        loaded.append((spec, load_scorer(spec, device=device)))
    return loaded


def score_round(rows: list[dict[str, Any]], scorers: list[tuple[Any, Any]], znorm: bool, root: Path) -> None:
    """Fill each row's `score_<column>` (None where a scorer gave no number) and the combined
    `score` = sum_k w_k s_k (s_k z-normalised over the round when `znorm`), in place."""
    from mmalign.scoring.manifest import combine_rows, score_rows

    for spec, scorer in scorers:
        for row, value in zip(rows, score_rows(scorer, rows, root), strict=True):
            row[f"score_{spec.column}"] = value
    combine_rows(rows, [spec for spec, _ in scorers], znorm)


def soft_label(gap: float, temperature: float) -> float:
    """P(chosen preferred) = sigmoid(gap / temperature) for a score gap >= 0."""
    return 1.0 / (1.0 + math.exp(-gap / temperature))


def record_kind(strategy: str) -> str:
    """The batch kind of a strategy's records: ranked lists, rewarded samples (rewards), else pairs."""
    return {"ranked": "ranked", "rewards": "rewarded"}.get(strategy, "pair")


def select_records(rows: list[dict[str, Any]], settings: Any, adv_clip_max: float,
                   global_std: bool) -> tuple[list[dict[str, Any]], Any]:
    """(records, Selection) of scored rows by `online.strategy`: best_worst / margin / ranked as
    `mmalign build-pairs scores`; soft = best_worst with `soft_label` from the score gap. Record
    outputs are the texts, or media paths relative to the round folder. rewards (DiffusionNFT): one
    "rewarded" record per sample with its group advantage clipped to ±adv_clip_max
    (`loss.adv_clip_max`), normalised by the round's std or the group's (`global_std`:
    `grpo.global_std`; `online/rewards.py`)."""
    from mmalign.builders.scores import build_scored_pairs, item_record

    if settings.strategy == "rewards":
        from mmalign.online.rewards import reward_records

        return reward_records(rows, adv_clip_max, global_std)

    strategy = "best_worst" if settings.strategy == "soft" else settings.strategy
    selection = build_scored_pairs(rows, strategy, settings.margin, "score", settings.list_size or None)
    records = []
    for item in selection.items:
        outputs = [r["text"] if r["kind"] == "text" else r["path"] for r in item.get("rows") or
                   [item["chosen"], item["rejected"]]]
        record = item_record(item, selection, outputs, (item.get("rows") or [item["chosen"]])[0].get("images"))
        if settings.strategy == "soft":
            record["soft_label"] = soft_label(item["margin"], settings.soft_temperature)
        records.append(record)
    return records, selection


def with_root(records: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Records as the trainer reads them: relative media paths resolve against the round folder
    (`_root`, which is never saved)."""
    return [dict(r, _root=str(folder)) for r in records]


def save_round(folder: Path, rows: list[dict[str, Any]], records: list[dict[str, Any]], fingerprint: str,
               meta: dict[str, Any]) -> None:
    """samples.jsonl, records.jsonl, then meta.json (with the fingerprint) under `folder`, atomically."""
    write_jsonl_atomic(folder / "samples.jsonl", rows, ensure_ascii=False)
    write_jsonl_atomic(folder / "records.jsonl", [{k: v for k, v in r.items() if k != "_root"} for r in records],
                       ensure_ascii=False)
    with atomic_path(folder / "meta.json") as tmp:
        tmp.write_text(json.dumps({**meta, "fingerprint": fingerprint}, indent=2))


def round_meta(folder: Path) -> dict[str, Any]:
    """The round's meta.json ({} when it has none)."""
    meta = folder / "meta.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load_round(folder: Path, fingerprint: str) -> list[dict[str, Any]] | None:
    """The records of a saved round (with `_root`), or None when it is missing, incomplete or
    from another run (another fingerprint)."""
    meta = folder / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("fingerprint") != fingerprint:
        return None
    try:
        return with_root(read_jsonl_rows(folder / "records.jsonl"), folder)
    except DataError as e:
        raise DataError(f"{e}; delete the round folder") from None
