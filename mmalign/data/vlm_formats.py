"""Readers for published vision-language preference datasets (`data.format`), each mapped to
the common VLM record (METHODS.md §4, §6)::

    {"images": [image, ...], "prompt": str | [messages], "chosen": str, "rejected": str, + provenance}

| format    | columns read                                                | source |
|-----------|-------------------------------------------------------------|--------|
| `rlhf_v`  | `image`, `text` (JSON string: question/chosen/rejected)     | openbmb/RLHF-V-Dataset (parquet) |
| `rlaif_v` | `image`, `question`, `chosen`, `rejected`                    | openbmb/RLAIF-V-Dataset (parquet shards) |
| `povid`   | `image`, `conversations`, `rejected_conversations`           | POVID preference data (json, LLaVA conversations) |
| `mdpo`    | `img_path`, `prompt`, `chosen`, `rejected`                   | mDPO preference data (json) |
| `trl_vlm` | `images` (or `image`), `prompt`, `chosen`, `rejected`        | TRL VLM preference data (e.g. rlaif-v_formatted) |

Provenance columns (`ds_name`, `idx`, `origin_dataset`, `origin_split`, `image_path`, `id`) are
kept when present. An image is raw bytes, a {"bytes", "path"} dict (the Hugging Face Image
feature) or a path relative to the data file's folder; it is decoded when a batch needs it.
`<image>` placeholders are removed from single-turn prompts (the likelihood puts the image
where its processor expects it); answers given as chat messages become their text.

`path`: a file (.parquet, .json, .jsonl), a folder of such files (sorted), a glob, or a
`datasets` folder written by `save_to_disk`. A missing column is a `DataError` naming it and
the file; a bad row is one naming the row. Parquet data is held as an Arrow table (compact,
no Python objects) and each record is built when asked for.
"""

from __future__ import annotations

import glob as globlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmalign.data.preference import read_records, validate_records
from mmalign.errors import DataError

PROVENANCE = ("ds_name", "idx", "origin_dataset", "origin_split", "image_path", "id")
PLACEHOLDER = re.compile(r"\s*<image>\s*")
SUFFIXES = (".parquet", ".json", ".jsonl")


# -- small mappers --------------------------------------------------------------------------
def strip_placeholders(text: str) -> str:
    """'<image>\\nWhat is this?' -> 'What is this?' (placeholders and the spaces around them)."""
    return PLACEHOLDER.sub(" ", text).strip()


def message_text(value: Any, where: str) -> str:
    """The text of an answer: a string, a message dict, or a list of messages whose content is
    a string or typed entries ({"type": "text", "text": ...})."""
    if isinstance(value, str):
        return value
    messages = [value] if isinstance(value, dict) else value
    if not isinstance(messages, list):
        raise DataError(f"{where}: expected an answer string or chat messages, got {type(value).__name__}")
    parts = []
    for m in messages:
        content = m.get("content", m.get("value", "")) if isinstance(m, dict) else m
        if isinstance(content, list):
            content = "".join(c.get("text") or "" for c in content if isinstance(c, dict) and c.get("type") == "text")
        parts.append(str(content))
    return "".join(parts)


def image_list(value: Any, where: str) -> list[Any]:
    """The images of a row as a list; a missing (null) image is a DataError naming the row."""
    images = list(value) if isinstance(value, (list, tuple)) else [value]
    for image in images:
        empty = image is None or (isinstance(image, dict) and not image.get("bytes") and not image.get("path"))
        if empty or (isinstance(image, (str, bytes)) and not image):
            raise DataError(f"{where}: missing image")
    return images


def _provenance(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in PROVENANCE if k in row and row[k] is not None}


# -- one mapper per format -------------------------------------------------------------------
def map_rlhf_v(row: dict[str, Any], where: str) -> dict[str, Any]:
    text = row["text"]
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: column 'text' is not valid JSON ({e})") from e
    missing = [k for k in ("question", "chosen", "rejected") if not isinstance(text, dict) or k not in text]
    if missing:
        raise DataError(f"{where}: column 'text' has no {', '.join(map(repr, missing))}")
    return {"images": image_list(row["image"], where), "prompt": strip_placeholders(text["question"]),
            "chosen": text["chosen"], "rejected": text["rejected"], **_provenance(row)}


def map_rlaif_v(row: dict[str, Any], where: str) -> dict[str, Any]:
    return {"images": image_list(row["image"], where), "prompt": strip_placeholders(row["question"]),
            "chosen": row["chosen"], "rejected": row["rejected"], **_provenance(row)}


def _split_conversation(turns: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], str]:
    """LLaVA turns [{"from": "human"|"gpt", "value"}] -> (chat messages before the last answer, last answer)."""
    if not turns or turns[-1].get("from") != "gpt":
        raise DataError(f"{where}: a conversation must end with a 'gpt' turn")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = [{"role": roles.get(t.get("from"), "user"), "content": t.get("value", "")} for t in turns[:-1]]
    return messages, turns[-1].get("value", "")


def map_povid(row: dict[str, Any], where: str) -> dict[str, Any]:
    prompt, chosen = _split_conversation(row["conversations"], f"{where}, conversations")
    rejected_prompt, rejected = _split_conversation(row["rejected_conversations"], f"{where}, rejected_conversations")
    if prompt != rejected_prompt:
        raise DataError(f"{where}: conversations and rejected_conversations differ before the last answer")
    if len(prompt) == 1 and prompt[0]["role"] == "user":  # single turn: a plain prompt
        prompt = strip_placeholders(prompt[0]["content"])
    return {"images": image_list(row["image"], where), "prompt": prompt, "chosen": chosen, "rejected": rejected,
            **_provenance(row)}


def map_mdpo(row: dict[str, Any], where: str) -> dict[str, Any]:
    return {"images": image_list(row["img_path"], where), "prompt": strip_placeholders(row["prompt"]),
            "chosen": message_text(row["chosen"], f"{where}, chosen"),
            "rejected": message_text(row["rejected"], f"{where}, rejected"), **_provenance(row)}


def map_trl_vlm(row: dict[str, Any], where: str) -> dict[str, Any]:
    images = row["images"] if "images" in row else row["image"]
    prompt = row["prompt"]
    return {"images": image_list(images, where), "prompt": strip_placeholders(prompt) if isinstance(prompt, str)
            else prompt, "chosen": message_text(row["chosen"], f"{where}, chosen"),
            "rejected": message_text(row["rejected"], f"{where}, rejected"), **_provenance(row)}


@dataclass(frozen=True)
class VLMFormat:
    """columns: required columns ("a|b": either); images: the image columns (not read when the
    text is validated at load); mapper(row, where) -> common record."""

    columns: tuple[str, ...]
    images: tuple[str, ...]
    mapper: Callable[[dict[str, Any], str], dict[str, Any]]


VLM_FORMATS: dict[str, VLMFormat] = {
    "rlhf_v": VLMFormat(("image", "text"), ("image",), map_rlhf_v),
    "rlaif_v": VLMFormat(("image", "question", "chosen", "rejected"), ("image",), map_rlaif_v),
    "povid": VLMFormat(("image", "conversations", "rejected_conversations"), ("image",), map_povid),
    "mdpo": VLMFormat(("img_path", "prompt", "chosen", "rejected"), ("img_path",), map_mdpo),
    "trl_vlm": VLMFormat(("images|image", "prompt", "chosen", "rejected"), ("images", "image"), map_trl_vlm),
}


# -- reading files ---------------------------------------------------------------------------
def data_files(path: str | Path) -> list[Path]:
    """A file, a folder's sorted .parquet/.json/.jsonl files, or a glob's matches."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(text))
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).iterdir() if p.suffix in SUFFIXES)
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise DataError(f"preference data not found: {path}")
    files = [f for f in files if f.suffix in SUFFIXES]
    if not files:
        raise DataError(f"{path}: no .parquet, .json or .jsonl files")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def read_rows(path: str | Path) -> tuple[Any, list[str]]:
    """(rows, column names): an Arrow table for parquet files, else a list of dicts."""
    if _is_saved_dataset(Path(path)):
        rows = read_records(path)
        return rows, sorted({k for r in rows for k in r})
    files = data_files(path)
    if all(f.suffix == ".parquet" for f in files):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(f) for f in files]
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        return table, list(table.column_names)
    rows = [r for f in files for r in read_records(f)]
    return rows, sorted({k for r in rows for k in r})


class VLMRecords(Sequence):
    """Common VLM records built on access from the rows of a published dataset."""

    def __init__(self, rows: Any, fmt: VLMFormat, source: str) -> None:
        self.rows, self.fmt, self.source = rows, fmt, source

    def __len__(self) -> int:
        return self.rows.num_rows if hasattr(self.rows, "num_rows") else len(self.rows)

    def _row(self, i: int) -> dict[str, Any]:
        return self.rows.slice(i, 1).to_pylist()[0] if hasattr(self.rows, "num_rows") else self.rows[i]

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.source}: record {i} out of range ({n} records)")
        return self.fmt.mapper(self._row(i), f"{self.source} row {i}")


def _check_columns(name: str, fmt: VLMFormat, columns: list[str], where: str) -> None:
    missing = [" or ".join(map(repr, c.split("|"))) for c in fmt.columns
               if not any(alt in columns for alt in c.split("|"))]
    if missing:
        raise DataError(f"{where}: {name} data has no column {', '.join(missing)} (columns: {', '.join(sorted(columns))})")


def load_vlm_format(path: str | Path, name: str) -> tuple[VLMRecords, str]:
    """`load_preference_data(path, format=name)`: records of dataset `name` in the common VLM
    format, every row's text mapped and validated now (images when a batch needs them)."""
    rows, columns = read_rows(path)
    return vlm_records(rows, columns, name, str(path))


def vlm_records(rows: Any, columns: list[str], name: str, source: str) -> tuple[VLMRecords, str]:
    """`load_vlm_format` of rows already read: an Arrow table (a parquet file, a Hub split) or
    a list of dicts, with its column names."""
    fmt = VLM_FORMATS[name]
    if isinstance(rows, list):  # json rows may each lack a column
        for i, row in enumerate(rows):
            _check_columns(name, fmt, list(row), f"{source} row {i}")
    _check_columns(name, fmt, columns, source)
    text = rows.drop_columns([c for c in fmt.images if c in columns]).to_pylist() if hasattr(rows, "num_rows") \
        else [{k: v for k, v in r.items() if k not in fmt.images} for r in rows]
    image = {c: "unread" for c in fmt.images}  # a stand-in, so the mapper checks the text only
    mapped = [fmt.mapper({**image, **row}, f"{source} row {i}") for i, row in enumerate(text)]
    validate_records(mapped, source, "pair")
    return VLMRecords(rows, fmt, source), "pair"


def load_rlhf_v(path: str | Path) -> tuple[VLMRecords, str]:
    return load_vlm_format(path, "rlhf_v")


def load_rlaif_v(path: str | Path) -> tuple[VLMRecords, str]:
    return load_vlm_format(path, "rlaif_v")


def load_povid(path: str | Path) -> tuple[VLMRecords, str]:
    return load_vlm_format(path, "povid")


def load_mdpo(path: str | Path) -> tuple[VLMRecords, str]:
    return load_vlm_format(path, "mdpo")


def load_trl_vlm(path: str | Path) -> tuple[VLMRecords, str]:
    return load_vlm_format(path, "trl_vlm")
