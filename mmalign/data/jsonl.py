"""Reading jsonl and text files so that bad bytes are one clear `DataError` naming the file and
line, never a raw `UnicodeDecodeError` / `JSONDecodeError` traceback.

Every jsonl reader of the trainer and the commands (preference data, prompt files, sample
manifests, online rounds, COCO answer caches) goes through `iter_jsonl`: each non-blank line
must be UTF-8 text holding one JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from mmalign.errors import DataError

_JSON_TYPES = {list: "a JSON list", str: "a JSON string", int: "a JSON number", float: "a JSON number",
               bool: "a JSON boolean", type(None): "JSON null"}


def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM on the first line is allowed
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: line {n} is not UTF-8 text (byte {e.start + 1} of the line is "
                        f"{raw[e.start:e.start + 1]!r}); re-save the file as UTF-8") from None


def iter_jsonl(path: str | Path, tolerate_torn_end: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a jsonl file. A line that is not
    UTF-8, not JSON, or JSON but not an object (`[1, 2]`, `"text"`, `null`) is a `DataError` naming
    the file and line, except a torn LAST line (no newline after it: a killed writer) when
    `tolerate_torn_end`, which ends the rows."""
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(_decode(raw, path, n))
        except json.JSONDecodeError as e:
            if tolerate_torn_end and n == len(lines):
                return
            raise DataError(f"{path}: line {n} is not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n} holds {_JSON_TYPES.get(type(row), 'a JSON value')}, not a JSON "
                            "object ({\"key\": value, ...})")
        yield n, row


def read_jsonl_rows(path: str | Path, tolerate_torn_end: bool = False) -> list[dict[str, Any]]:
    """The objects of a jsonl file, in order (`iter_jsonl` without the line numbers)."""
    return [row for _, row in iter_jsonl(path, tolerate_torn_end)]


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a .txt prompt list, a .json file); non-UTF-8 bytes are a `DataError`
    naming the file and line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {data[e.start:e.start + 1]!r}); "
                        "re-save the file as UTF-8") from None


def read_json(path: str | Path) -> Any:
    """A UTF-8 JSON file; bad bytes or bad JSON are a `DataError` naming the file (and line)."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
