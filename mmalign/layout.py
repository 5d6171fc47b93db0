"""Where each item of a batch sits: the one home of the item layout that `flatten`, every
Likelihood's `collate`, the reference cache and the pair losses share.

A batch of B records holds N items, one per scored output, in this order:
- pair:     the B chosen items, then the B rejected items (N = 2B): items i and B+i are
            record i's chosen and rejected output;
- ranked:   each record's K completions in order, list after list (N = B*K);
- unpaired: one item per record (N = B);
- step:     one sampled transition per record (N = B), slot 0 = completion (x_{t-1}; GRPO).
- rewarded: one item per record (N = B): a sampled output with its reward (DiffusionNFT).

A record's outputs are numbered by their *slot*: pair 0 = chosen, 1 = rejected; ranked
k = completions[k]; unpaired, step and rewarded 0 = completion. `item_slots` gives (record, slot) of every item.

No torch at import: the helpers work on lists, and `chosen_rejected` / `repeat_pairs` also on
tensors (anything with `len`, slicing and `repeat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from mmalign.errors import DataError

KINDS = ("pair", "ranked", "unpaired", "step", "rewarded")
T = TypeVar("T")


def check_kind(kind: str) -> None:
    """A `DataError` for a batch kind that is none of `KINDS`."""
    if kind not in KINDS:
        raise DataError(f"unknown batch kind '{kind}'")


def record_outputs(record: dict[str, Any], kind: str) -> list[Any]:
    """The outputs of a record by slot: pair [chosen, rejected], ranked its K completions,
    unpaired and rewarded [completion]."""
    check_kind(kind)
    if kind == "pair":
        return [record["chosen"], record["rejected"]]
    if kind == "ranked":
        return list(record["completions"])
    return [record["completion"]]


def output_fields(record: dict[str, Any], kind: str) -> list[str]:
    """The field name of each output of a record, by slot (for messages): pair ["chosen",
    "rejected"], ranked ["completions[0]", ...], unpaired ["completion"]."""
    check_kind(kind)
    if kind == "pair":
        return ["chosen", "rejected"]
    if kind == "ranked":
        return [f"completions[{k}]" for k in range(len(record["completions"]))]
    return ["completion"]


def item_slots(kind: str, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(record position, slot) of every item of a batch, in item order (module docstring).
    sizes[i]: how many outputs record i has (a pair's 2 are implied; K of a ranked list; 1)."""
    check_kind(kind)
    if kind == "pair":
        return [(i, 0) for i in range(len(sizes))] + [(i, 1) for i in range(len(sizes))]
    return [(i, j) for i, n in enumerate(sizes) for j in range(n)]


def batch_slots(records: Sequence[dict[str, Any]], kind: str) -> list[tuple[int, int]]:
    """`item_slots` of a list of records (each record's own number of outputs)."""
    return item_slots(kind, [len(record_outputs(r, kind)) for r in records])


def by_record(values: Sequence[T], slots: Sequence[tuple[int, int]], num_records: int) -> list[list[T]]:
    """Per-item values (item order) regrouped per record, each record's in slot order (the
    layout keeps a record's items in slot order): the inverse of reading `per_record[i][j]`
    for (i, j) in `slots`."""
    if len(values) != len(slots):
        raise ValueError(f"{len(values)} values for {len(slots)} items")
    out: list[list[T]] = [[] for _ in range(num_records)]
    for (i, _), value in zip(slots, values):
        out[i].append(value)
    return out


def chosen_rejected(items: T) -> tuple[T, T]:
    """(chosen half, rejected half) of anything holding a paired batch's 2B items in order
    (a tensor's dim 0, a list)."""
    n = len(items)  # type: ignore[arg-type]
    if n % 2:
        raise ValueError(f"a paired batch needs an even number of items, got {n}")
    b = n // 2
    return items[:b], items[b:]  # type: ignore[index]


def repeat_pairs(rows: T) -> T:
    """B per-record rows (a list, or a tensor's dim 0) made per-item for a paired batch: the
    same rows for the chosen block and for the rejected block (2B)."""
    if isinstance(rows, (list, tuple)):
        return rows * 2  # type: ignore[return-value]
    return rows.repeat(2, *[1] * (rows.ndim - 1))  # type: ignore[attr-defined]
