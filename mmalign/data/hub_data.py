"""Hub dataset ids in `data.train` / `data.eval`, read through Hugging Face `datasets`.

    ORG/NAME[@REVISION][:[SUBSET:]SPLIT[SLICE]]

    yuvalkirstain/pickapic_v2                 split train of the default subset, branch main
    openbmb/RLAIF-V-Dataset@<commit>:train    a pinned revision (branch, tag or commit)
    org/name:default:validation[:200]         subset `default`, the first 200 rows of validation

A value is read as a Hub id only when no such local file or folder exists, it has the shape
`org/name` (one slash) and does not end in .jsonl / .json / .parquet; local files, folders,
globs and `pkg://` paths keep their meaning. Online, `datasets.load_dataset(ORG/NAME, ...)`
downloads into the user's caches; with HF_HUB_OFFLINE=1 the snapshot of REVISION is taken from
the Hub cache (HF_HUB_CACHE, `huggingface_hub`'s layout) and loaded from there.

`data.streaming: N` (> 0) streams the split and keeps its first N rows (the rest is never
downloaded: Pick-a-Pic v2's 335 GB need not be); 0 loads the whole split (memory-mapped Arrow).
Rows become mmalign records through the reader `data.format` names, or, with `auto`, the one
whose columns the split has: pickapic (`caption, label_0, jpg_0, jpg_1`), rlaif_v, rlhf_v,
povid, mdpo, trl_vlm (mmalign/data/vlm_formats.py), else plain records (`prompt, chosen,
rejected`, ...; mmalign/data/preference.py). Images stay undecoded bytes until a batch needs them.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.errors import ConfigError, DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_REST = re.compile(r"(?:(?P<subset>[\w.-]+):)?(?P<split>[\w.-]+)(?P<slice>\[[^\]]*\])?")
HUB_FORMATS = ("pickapic", "rlaif_v", "rlhf_v", "povid", "mdpo", "trl_vlm")


@dataclass(frozen=True)
class DataSpec:
    """A parsed Hub dataset id (see the module docstring)."""

    repo: str
    revision: str | None = None
    subset: str | None = None
    split: str = "train"
    slice: str = ""

    @property
    def split_arg(self) -> str:
        return self.split + self.slice


def parse_data_id(text: str) -> DataSpec | None:
    """'org/name@v1:sub:train[:10]' -> DataSpec; None when `text` cannot be a Hub dataset id."""
    from mmalign.hub import is_hub_id, split_revision

    head, sep, rest = text.partition(":")
    if head.endswith(FILE_SUFFIXES) or head.count("/") != 1 or not is_hub_id(head):
        return None
    m = _REST.fullmatch(rest) if sep else None
    if sep and m is None:
        return None
    repo, revision = split_revision(head)
    if not m:
        return DataSpec(repo, revision)
    return DataSpec(repo, revision, m["subset"], m["split"], m["slice"] or "")


def local_data_path(path: str | Path) -> str | Path:
    """`pkg://NAME/...` -> the shipped (or built, `pkg://tiny/...`) file; anything else unchanged."""
    from mmalign.hub import PACKAGE_PREFIX, resolve_path

    return resolve_path(path, "data") if str(path).startswith(PACKAGE_PREFIX) else path


def hub_data_id(path: Any) -> DataSpec | None:
    """The DataSpec of `path` when it names a Hub dataset rather than a local file (module docstring)."""
    if not isinstance(path, str) or Path(path).expanduser().exists() or any(c in path for c in "*?"):
        return None
    return parse_data_id(path)


def _cache_dir() -> str | None:
    """HF_DATASETS_CACHE as set now (datasets reads it once, at import)."""
    return os.environ.get("HF_DATASETS_CACHE") or None


def _not_had(text: str, spec: DataSpec, reason: str) -> ConfigError:
    rev = f" at revision {spec.revision!r}" if spec.revision else ""
    return ConfigError(f"data {text!r}: no local file or folder {Path(text).expanduser().absolute()} exists, and the "
                       f"Hub dataset {spec.repo!r}{rev} cannot be had: {reason}")


def _source(text: str, spec: DataSpec) -> tuple[str, str | None]:
    """(what load_dataset reads, its revision): the repo id online; offline, its cached snapshot."""
    from mmalign.hub import cache_dir, offline

    if not offline():
        return spec.repo, spec.revision
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec.repo, repo_type="dataset", revision=spec.revision, cache_dir=cache_dir(),
                                 local_files_only=True), None
    except Exception:  # noqa: BLE001 - any cache miss becomes one line
        where = cache_dir() or "the default Hugging Face cache"
        raise _not_had(text, spec, f"not in the Hub cache {where} (HF_HUB_OFFLINE=1: nothing is downloaded)") from None


def _undecoded(dataset: Any) -> Any:
    """A streamed dataset whose Image / Audio columns give {"bytes", "path"}, not decoded objects."""
    import datasets

    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, (datasets.Image, datasets.Audio)):
            dataset = dataset.cast_column(name, type(feature)(decode=False))
    return dataset


def hub_table(text: str, spec: DataSpec, streaming: int = 0) -> Any:
    """The split of `spec` as a pyarrow Table: the whole split (memory-mapped), or its first
    `streaming` rows read from a stream."""
    import datasets
    import pyarrow as pa

    if isinstance(streaming, bool) or not isinstance(streaming, int) or streaming < 0:
        raise ConfigError(f"data.streaming takes a row count N >= 0 (0: load the whole split), got {streaming!r}")
    if streaming and spec.slice:
        raise ConfigError(f"data {text!r}: a split slice {spec.slice} needs data.streaming: 0 "
                          f"(streaming keeps the first data.streaming={streaming} rows)")
    source, revision = _source(text, spec)
    try:
        dataset = datasets.load_dataset(source, spec.subset, split=spec.split_arg, revision=revision,
                                        streaming=bool(streaming), cache_dir=_cache_dir())
        if not streaming:
            return dataset.with_format("arrow")[:]  # zero-copy over the memory-mapped split
        rows = list(itertools.islice(_undecoded(dataset), streaming))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types: one line naming the id
        raise _not_had(text, spec, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not rows:
        raise DataError(f"data {text!r}: the stream gave no rows")
    return pa.Table.from_pylist(rows)


def detect_format(columns: Sequence[str], source: str) -> str:
    """The reader whose columns the table has (module docstring), or "plain"."""
    from mmalign.data.pickapic import REQUIRED_COLUMNS
    from mmalign.data.vlm_formats import VLM_FORMATS

    names = set(columns)
    if set(REQUIRED_COLUMNS) <= names:
        return "pickapic"
    for name in HUB_FORMATS[1:]:
        if all(any(alt in names for alt in c.split("|")) for c in VLM_FORMATS[name].columns):
            return name
    return "plain"


def records_from_table(table: Any, format: str, source: str, kind: str | None = None
                       ) -> tuple[Sequence[dict[str, Any]], str]:
    """(records, kind) of an Arrow table through the reader `format` names (auto: `detect_format`)."""
    from mmalign.data.preference import validate_records

    name = detect_format(table.column_names, source) if format == "auto" else format
    if name == "pickapic":
        from mmalign.data.pickapic import PickAPicPairs

        return PickAPicPairs(source, tables=[table]), "pair"
    if name in HUB_FORMATS:
        from mmalign.data.vlm_formats import vlm_records

        return vlm_records(table, list(table.column_names), name, source)
    if name != "plain":
        raise ConfigError(f"data.format {format!r} does not read Hub datasets; use auto or one of "
                          f"{', '.join(HUB_FORMATS)}")
    records = table.to_pylist()
    return records, validate_records(records, source, kind)


def load_hub_data(text: str, spec: DataSpec, kind: str | None = None, format: str = "auto",
                  streaming: int = 0) -> tuple[Sequence[dict[str, Any]], str]:
    """`load_preference_data` of a Hub dataset id: (records, kind)."""
    table = hub_table(text, spec, streaming)
    records, found = records_from_table(table, format, text, kind)
    if kind is not None and found != kind:
        raise DataError(f"{text}: holds {found} records, expected {kind}")
    return records, found
