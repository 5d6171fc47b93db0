"""Pick-a-Pic v2 parquet shards -> a lazy sequence of image pair records (data.format: pickapic).

`load_pickapic(path)` takes one shard, a folder of shards or a glob. Loading reads only the
label columns (`label_0`, `are_different`, `has_label`) row group by row group and keeps a
compact index (shard, row group, row, winner swapped?) of the rows to train on; image bytes
are read when a record is asked for, one row group at a time (a small LRU cache keeps the
last few row groups).

Filtering. The official Diffusion-DPO code (SalesforceAIResearch/DiffusionDPO `train.py`,
"eliminate no-decisions") keeps the rows with `label_0 in (0, 1)` and nothing else: it never
reads `are_different` or `has_label`, and it swaps jpg_0/jpg_1 when `label_0 == 0` so the
winner comes first (851,293 of 959,040 train rows). The diffusers research_projects
`diffusion_dpo` scripts do no filtering of their own (they only flip on `label_0 == 0`).
The defaults here do the same as the official code:
- ties (`label_0 == 0.5`) are dropped (`keep_ties=True` keeps them as `soft_label` 0.5 records,
  image 0 first, for losses that read soft labels);
- a missing / NaN / other `label_0` has no usable label: dropped, counted as unlabelled;
- `are_different == False` and `has_label == False` rows with a decisive label are KEPT
  (official behaviour) and counted in the summary; `drop_not_different=True` /
  `drop_unlabelled=True` drop them. (A pair of identical images gives a zero DPO gradient.)
- unreadable images: `verify_images=True` decodes every kept pair at load (streaming one row
  group of image bytes at a time) and drops bad rows; at full scale (335 GB) that is hours,
  so the default (`None`) verifies only small data (<= 5,000 candidate rows). Unverified data
  is checked on access instead (`check_on_access`, a few ms per pair): an unreadable pair is
  reported with its shard and row and replaced by the next readable record (deterministic,
  so every process and every epoch sees the same replacement).
Each reason is counted once, in this order: unlabelled, not different, tie, unreadable.
"""

from __future__ import annotations

import glob as globlib
import operator
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.io import atomic_path
from mmalign.data.media import image_readable
from mmalign.errors import DataError

def v2_schema() -> Any:
    """The exact Arrow schema of the Pick-a-Pic v2 parquet shards (METHODS.md §6)."""
    import pyarrow as pa

    return pa.schema([
        ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()), ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()),
        ("model_0", pa.string()), ("model_1", pa.string()),
        ("ranking_id", pa.int64()), ("user_id", pa.int64()), ("num_example_per_prompt", pa.int64()),
    ])


REQUIRED_COLUMNS = ("caption", "label_0", "jpg_0", "jpg_1")
FLAG_COLUMNS = ("are_different", "has_label")  # optional: a missing flag counts as True
INFO_COLUMNS = ("ranking_id", "image_0_uid", "image_1_uid", "model_0", "model_1")  # optional provenance
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
AUTO_VERIFY_MAX_ROWS = 5000
MAX_REPORTED = 20  # unreadable rows printed one by one; the rest only counted


def find_shards(path: str | Path) -> list[Path]:
    """The parquet shards of `path` (a file, a folder's sorted `*.parquet`, or a glob)."""
    text = str(path)
    if any(c in text for c in "*?["):
        shards = sorted(Path(p) for p in globlib.glob(text) if p.endswith(".parquet"))
    elif Path(path).is_dir():
        shards = sorted(Path(path).glob("*.parquet"))
        splits = sorted({s.name.split("-")[0] for s in shards} & set(SPLITS))
        if len(splits) > 1:
            raise DataError(f"{path}: the folder mixes Pick-a-Pic splits ({', '.join(splits)}); "
                            f"point at one split with a glob, e.g. '{Path(path) / 'train-*.parquet'}'")
    elif Path(path).is_file():
        shards = [Path(path)]
    else:
        raise DataError(f"Pick-a-Pic data not found: {path}")
    if not shards:
        raise DataError(f"{path}: no .parquet shards (for the Hub layout use '<dir>/data/train-*.parquet')")
    return shards


class TableShard:
    """An Arrow table read like a `pyarrow.parquet.ParquetFile` (what PickAPicPairs asks of a
    shard): row groups of `group_rows` rows."""

    def __init__(self, table: Any, group_rows: int = 64) -> None:
        self.table, self.group_rows, self.schema_arrow = table, group_rows, table.schema
        self.num_row_groups = max(1, -(-table.num_rows // group_rows))
        self.metadata = self

    def row_group(self, g: int) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(num_rows=len(self.table.slice(g * self.group_rows, self.group_rows)))

    def read_row_group(self, g: int, columns: list[str] | None = None) -> Any:
        part = self.table.slice(g * self.group_rows, self.group_rows)
        return part.select(columns) if columns is not None else part


class PickAPicPairs:
    """Lazy pair records over Pick-a-Pic shards: `len()` and `[i]` only. `summary` holds the
    load counts (and the unreadable rows found on access so far, when not verified)."""

    def __init__(self, path: str | Path, *, keep_ties: bool = False, drop_not_different: bool = False,
                 drop_unlabelled: bool = False, verify_images: bool | None = None,
                 check_on_access: bool = True, cache_row_groups: int = 4, verbose: bool = True,
                 tables: list[Any] | None = None) -> None:
        # tables: Arrow tables read in place of parquet shards (a Hub split, mmalign/data/hub_data.py)
        self.tables = tables
        self.path = str(path)
        self.shards = [Path(f"{path}#{i}") for i in range(len(tables))] if tables else find_shards(path)
        self.keep_ties, self.drop_not_different, self.drop_unlabelled = keep_ties, drop_not_different, drop_unlabelled
        self.cache_row_groups, self.verbose = max(1, cache_row_groups), verbose
        self._files: dict[int, Any] = {}
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._bad: set[int] = set()
        self._replaced: dict[int, int] = {}
        self.unreadable_rows: list[tuple[str, int, str]] = []  # (shard, row in shard, column)
        counts = self._scan()
        candidates = int(len(self._row))
        self.verified = candidates <= AUTO_VERIFY_MAX_ROWS if verify_images is None else bool(verify_images)
        if self.verified:
            self._verify()
        self.check_on_access = check_on_access and not self.verified
        self.summary: dict[str, Any] = dict(counts, kept=len(self), unreadable=len(self.unreadable_rows),
                                            verified=self.verified, shards=len(self.shards))
        self.summary["line"] = self._line()
        if verbose:
            print(f"[mmalign] {self.summary['line']}")

    # -- index -------------------------------------------------------------------
    def _file(self, s: int) -> Any:
        if s not in self._files and self.tables:
            self._files[s] = TableShard(self.tables[s])
        if s not in self._files:
            import pyarrow.parquet as pq

            try:
                self._files[s] = pq.ParquetFile(self.shards[s])
            except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a bad file)
                raise DataError(f"{self.shards[s]}: not a readable parquet file ({e})") from e
        return self._files[s]

    def _scan(self) -> dict[str, int]:
        import pyarrow as pa
        import pyarrow.compute as pc

        c = dict(rows=0, ties=0, not_different=0, unlabelled=0, kept_not_different=0, kept_unlabelled=0)
        parts: list[tuple[np.ndarray, ...]] = []
        self._columns: list[list[str]] = []  # what a record read takes from each shard
        self._offsets: list[np.ndarray] = []  # first row (in the shard) of each row group
        for s, shard in enumerate(self.shards):
            pf = self._file(s)
            names = set(pf.schema_arrow.names)
            missing = [col for col in REQUIRED_COLUMNS if col not in names]
            if missing:
                raise DataError(f"{shard}: Pick-a-Pic shard has no column {', '.join(map(repr, missing))} "
                                f"(columns: {', '.join(sorted(names))})")
            self._columns.append(["caption", *IMAGE_COLUMNS, *(col for col in INFO_COLUMNS if col in names)])
            flags = [col for col in FLAG_COLUMNS if col in names]
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self._offsets.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=["label_0", *flags])  # never the image columns
                label = pc.fill_null(table.column("label_0").cast(pa.float64()), float("nan")).to_numpy()

                def flag(name: str) -> np.ndarray:
                    if name not in flags:
                        return np.ones(len(label), bool)
                    return pc.fill_null(table.column(name), True).to_numpy(zero_copy_only=False).astype(bool)

                different, labelled = flag("are_different"), flag("has_label")
                tie, decisive = label == 0.5, (label == 0) | (label == 1)
                unlabelled = ~(tie | decisive) | (~labelled if self.drop_unlabelled else False)
                not_different = ~unlabelled & ~different & self.drop_not_different
                tie_dropped = ~unlabelled & ~not_different & tie & (not self.keep_ties)
                keep = ~(unlabelled | not_different | tie_dropped)
                c["rows"] += len(label)
                c["unlabelled"] += int(unlabelled.sum())
                c["not_different"] += int(not_different.sum())
                c["ties"] += int(tie_dropped.sum())
                c["kept_not_different"] += int((keep & ~different).sum())
                c["kept_unlabelled"] += int((keep & ~labelled).sum())
                rows = np.flatnonzero(keep)
                parts.append((np.full(len(rows), s, np.int32), np.full(len(rows), g, np.int32),
                              rows.astype(np.int32), label[rows] == 0, tie[rows]))
        cols = list(zip(*parts)) if parts else [[np.zeros(0, t)] for t in (np.int32,) * 3 + (bool,) * 2]
        self._shard, self._group, self._row, self._swap, self._tie = (np.concatenate(x) for x in cols)
        return c

    def _where(self, k: int) -> tuple[str, int]:
        s = int(self._shard[k])
        return self.shards[s].name, int(self._offsets[s][self._group[k]] + self._row[k])

    def _report(self, k: int, column: str) -> None:
        shard, row = self._where(k)
        self.unreadable_rows.append((shard, row, column))
        if self.verbose and len(self.unreadable_rows) <= MAX_REPORTED:
            print(f"[mmalign] pick-a-pic: skipping {shard} row {row}: unreadable image in {column}"
                  + (" (further ones only counted)" if len(self.unreadable_rows) == MAX_REPORTED else ""))

    def _verify(self) -> None:
        """Decode every kept pair, one row group of image bytes in memory at a time."""
        bad = np.zeros(len(self._row), bool)
        keys = self._shard.astype(np.int64) << 32 | self._group
        edges = [0, *(np.flatnonzero(np.diff(keys)) + 1), len(keys)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            if lo == hi:
                continue
            table = self._file(int(self._shard[lo])).read_row_group(int(self._group[lo]), columns=list(IMAGE_COLUMNS))
            for k in range(lo, hi):
                for column in IMAGE_COLUMNS:
                    if not image_readable(table.column(column)[int(self._row[k])].as_py()):
                        self._report(k, column)
                        bad[k] = True
                        break
        if bad.any():
            self._shard, self._group, self._row, self._swap, self._tie = (
                a[~bad] for a in (self._shard, self._group, self._row, self._swap, self._tie))

    def _line(self) -> str:
        c = self.summary
        line = (f"pick-a-pic: {c['kept']} pairs kept from {c['rows']} rows ({c['ties']} ties dropped, "
                f"{c['not_different']} not different, {c['unlabelled']} unlabelled, {c['unreadable']} unreadable)")
        if c["kept_not_different"] or c["kept_unlabelled"]:
            line += (f"; kept as the official recipe does: {c['kept_not_different']} with are_different=False, "
                     f"{c['kept_unlabelled']} with has_label=False")
        if not self.verified:
            line += "; images not verified at load: unreadable pairs are reported and replaced on access"
        return line

    # -- records -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._row)

    def _group_table(self, s: int, g: int) -> Any:
        key = (s, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self._file(s).read_row_group(g, columns=self._columns[s])
        self._cache[key] = table
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return table

    def _record(self, k: int) -> dict[str, Any]:
        s, g, r = int(self._shard[k]), int(self._group[k]), int(self._row[k])
        row = self._group_table(s, g).slice(r, 1).to_pylist()[0]
        w, l = ("1", "0") if self._swap[k] else ("0", "1")  # noqa: E741 (winner, loser)
        shard, at = self._where(k)
        if not isinstance(row["caption"], str):
            raise DataError(f"pick-a-pic {shard} row {at}: the caption is {row['caption']!r}, not text")
        record = {"prompt": row["caption"], "chosen": row[f"jpg_{w}"], "rejected": row[f"jpg_{l}"],
                  "ranking_id": row.get("ranking_id"),
                  "chosen_uid": row.get(f"image_{w}_uid"), "rejected_uid": row.get(f"image_{l}_uid"),
                  "model_chosen": row.get(f"model_{w}"), "model_rejected": row.get(f"model_{l}"),
                  "source": f"{shard}:{at}"}
        if self._tie[k]:
            record["soft_label"] = 0.5
        return record

    def __getitem__(self, i: int) -> dict[str, Any]:
        i, n = operator.index(i), len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"pick-a-pic record {i} out of range ({n} records)")
        if not self.check_on_access:
            return self._record(i)
        start = self._replaced.get(i, i)
        for step in range(n):
            k = (start + step) % n
            if k in self._bad:
                continue
            record = self._record(k)
            bad = next((key for key in ("chosen", "rejected") if not image_readable(record[key])), None)
            if bad is None:
                if k != i:
                    self._replaced[i] = k
                return record
            self._bad.add(k)
            self._report(k, f"jpg_{int(self._swap[k]) ^ (bad == 'rejected')}")
            self.summary["unreadable"] = len(self.unreadable_rows)
            self.summary["line"] = self._line()
        raise DataError(f"{self.path}: no Pick-a-Pic record has readable images")

    def __getstate__(self) -> dict[str, Any]:  # open files and cached tables stay behind
        return dict(self.__dict__, _files={}, _cache=OrderedDict())


def load_pickapic(path: str | Path, **options: Any) -> tuple[PickAPicPairs, str]:
    """`load_preference_data(path, format="pickapic")`: lazy winner-first pair records."""
    return PickAPicPairs(path, **options), "pair"


def rewrite_row_groups(path: str | Path, out_dir: str | Path, row_group_size: int = 64) -> list[Path]:
    """Copy shards with small row groups (a record read costs one row group of images), one
    source row group in memory at a time; each output is written to a temp name, then renamed."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in find_shards(path):
        pf, target = pq.ParquetFile(shard), out_dir / shard.name
        with atomic_path(target) as tmp, pq.ParquetWriter(tmp, pf.schema_arrow) as writer:
            for g in range(pf.num_row_groups):
                writer.write_table(pf.read_row_group(g), row_group_size=row_group_size)
        written.append(target)
    return written
