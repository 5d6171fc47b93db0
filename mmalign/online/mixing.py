"""Mixing offline records into online rounds (`data.train` + `online.offline_per_round`).

Rule: round r trains on its online records followed by N = online.offline_per_round records of
data.train: the first N of a permutation of data.train's rows seeded by (train.seed, r), so
without replacement inside a round and independent across rounds. The offline records must
be of the round's kind (pair with best_worst / margin / soft, ranked with ranked). The rows
drawn are kept in the round's meta.json (`offline_rows`); records.jsonl holds the online ones.
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.errors import ConfigError
from mmalign.seeds import mix_seed

OFFLINE_SEED_OFFSET = 53


class OfflineMix:
    """data.train's records and the seeded per-round draw of `online.offline_per_round` of them."""

    def __init__(self, cfg: Any, kind: str) -> None:
        from mmalign.data.preference import load_split

        self.count, self.seed = cfg.online.offline_per_round, cfg.train.seed
        self.records, found = load_split(cfg.data.train, format=cfg.data.format, streaming=cfg.data.streaming)
        if found != kind:
            raise ConfigError(f"data.train holds {found} records but online.strategy {cfg.online.strategy} builds "
                              f"{kind} records: mixing needs one kind (pair with pair, ranked with ranked)")
        if self.count > len(self.records):
            raise ConfigError(f"online.offline_per_round={self.count} is more than data.train's "
                              f"{len(self.records)} records")

    def rows(self, round_index: int) -> list[int]:
        """The data.train rows of round `round_index` (module docstring)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, round_index, offset=OFFLINE_SEED_OFFSET))
        return torch.randperm(len(self.records), generator=generator)[: self.count].tolist()

    def records_of(self, round_index: int) -> list[dict[str, Any]]:
        """The offline records of the round, in draw order (each with its own `_root`)."""
        return [dict(self.records[i]) for i in self.rows(round_index)]
