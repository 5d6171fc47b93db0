"""Length-grouped micro-batches (`data.group_by_length`): records of similar length share a batch,
so padded batches compute less padding (what HF's `group_by_length` / `LengthGroupedSampler` does).

Let G = train.batch_size × processes (the global micro-batch), K = data.group_by_length, N records
with lengths ℓ_i (`MeasuresLength.record_length`). Epoch e's order starts from `StreamSampler`'s
seeded permutation π_e and is regrouped:

  1. head h_e = min((−e·N) mod G, N): the first h_e entries of π_e stay as they are (they finish
     the global batch that the previous epoch's last entries began), so every later global batch
     of the epoch lines up with a group below;
  2. the rest, in windows of K·G consecutive entries: each window sorted by ℓ, longest first
     (a stable sort: ties keep their π_e order), cut into global batches of G (the epoch's last
     batch may be shorter and stays last);
  3. the full batches of window w are put in a seeded random order (mix_seed(seed, e, w)), so the
     length of consecutive steps does not saw-tooth down each window as HF's order does;
  4. the widest full batch (the longest record among them; ties: the first) is swapped with the
     epoch's first full batch (as HF puts its longest megabatch first): every full batch has G rows,
     so a padded batch that does not fit in memory fails at the first step of the run, not hours in.

Each record is still read exactly once per epoch, and the order is a pure function of (seed,
epoch, lengths, G, K): resume is exact, and 2 processes equal 1 at the same global batch (rank r
takes entries [r·B, (r+1)·B) of each global batch, as `StreamSampler`). Within a global batch the
longest rows go to rank 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmalign.data.preference import StreamSampler
from mmalign.errors import ConfigError, DataError
from mmalign.seeds import ROW, RUN, STEP, mix_seed
from mmalign.types import MeasuresLength, MicroBatchSampler


def group_by_length(order: Sequence[int], lengths: Sequence[int], batch: int, window: int, head: int = 0,
                    shuffle: Callable[[int, int], list[int]] | None = None) -> list[int]:
    """One epoch's length-grouped order (steps 1-4 of the module docstring).

    order: the epoch's permutation π (N record indices); lengths: ℓ per record index;
    batch: G; window: K (groups of K·G entries); head: h, entries left as they are;
    shuffle(w, count): the order of window w's `count` full batches (None: as sorted).
    Returns a permutation of `order`."""
    order = list(order)
    head = min(head, len(order))
    out, rest = order[:head], order[head:]
    batches, tail = [], []  # the full global batches after the head, in order; the shorter last one
    for w, start in enumerate(range(0, len(rest), window * batch)):
        ranked = sorted(rest[start:start + window * batch], key=lambda i: -lengths[i])  # stable
        cut = [ranked[j:j + batch] for j in range(0, len(ranked), batch)]
        full = [c for c in cut if len(c) == batch]
        picks = shuffle(w, len(full)) if shuffle is not None else range(len(full))
        batches += [full[j] for j in picks]
        tail = [i for c in cut if len(c) < batch for i in c]  # only the last window has one: it stays last
    if batches:
        widest = max(range(len(batches)), key=lambda j: max(lengths[i] for i in batches[j]))
        batches[0], batches[widest] = batches[widest], batches[0]
    return out + [i for b in batches for i in b] + tail


class LengthGroupedSampler:
    """`MicroBatchSampler` over the length-grouped stream (module docstring): micro-step m of
    process r of W reads stream entries [m·B·W + r·B, +B), as `StreamSampler` does.

    lengths: ℓ per record; seed: train.seed; window: K = data.group_by_length (>= 1)."""

    def __init__(self, lengths: Sequence[int], seed: int, window: int) -> None:
        self.stream = StreamSampler(len(lengths), seed)
        self.lengths, self.seed, self.window = list(lengths), seed, window
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _shuffle(self, epoch: int) -> Callable[[int, int], list[int]]:
        def order(w: int, count: int) -> list[int]:
            # offset 1: window 0 of epoch 0 does not reuse the seed of π_0 (seed·RUN + epoch)
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, w, strides=(RUN, ROW, STEP), offset=1))
            return torch.randperm(count, generator=g).tolist()

        return order

    def epoch_order(self, epoch: int, batch: int) -> list[int]:
        """Epoch `epoch`'s record order at global batch G = `batch` (two kept: a global batch may
        straddle two epochs)."""
        key = (epoch, batch)
        if key not in self._orders:
            n = len(self.lengths)
            perm = self.stream.epoch_order(epoch).tolist()
            order = group_by_length(perm, self.lengths, batch, self.window, (-epoch * n) % batch, self._shuffle(epoch))
            self._orders = {k: v for k, v in self._orders.items() if k[0] == epoch - 1 and k[1] == batch}
            self._orders[key] = order
        return self._orders[key]

    def micro_batch(self, micro_step: int, batch_size: int, rank: int, world_size: int) -> list[int]:
        g, n = batch_size * world_size, len(self.lengths)
        start = micro_step * g + rank * batch_size
        return [self.epoch_order(pos // n, g)[pos % n] for pos in range(start, start + batch_size)]


def record_lengths(likelihood: MeasuresLength, records: Sequence[dict[str, Any]], kind: str,
                   where: str = "data.train") -> list[int]:
    """ℓ_i = `likelihood.record_length` of every record; one that cannot be measured is a
    DataError naming its row."""
    lengths = []
    for i in range(len(records)):
        try:
            lengths.append(int(likelihood.record_length(dict(records[i], _index=i), kind)))
        except (DataError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"data.group_by_length: {where} row {i}: cannot measure its length ({e})") from e
    return lengths


def build_sampler(cfg: Any, likelihood: Any, records: Sequence[dict[str, Any]], kind: str) -> MicroBatchSampler:
    """The trainer's sampler over offline records: `StreamSampler`, or with `data.group_by_length`
    K > 0 a `LengthGroupedSampler` over the records' lengths (measured once, here)."""
    window = cfg.data.group_by_length
    if window == 0:
        return StreamSampler(len(records), cfg.train.seed)
    if not isinstance(likelihood, MeasuresLength):
        raise ConfigError(f"data.group_by_length needs record lengths, which {type(likelihood).__name__} does not "
                          "give: use a token likelihood (causal_lm, llava and the VLM families), or set it to 0")
    return LengthGroupedSampler(record_lengths(likelihood, records, kind), cfg.train.seed, window)
