"""atomic_path: a file that exists is complete; a failed write leaves the old one alone."""

from __future__ import annotations

import pytest

from mmalign.io import atomic_path


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "sub" / "index.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        tmp.write_text("v1")
    assert target.read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "v1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["index.json"]  # no temp file left


def test_write_jsonl_atomic_writes_one_json_per_line_in_utf8(tmp_path):
    from mmalign.io import write_jsonl_atomic

    path = tmp_path / "sub" / "rows.jsonl"
    write_jsonl_atomic(path, [{"a": "é"}, {"b": 1}])
    assert path.read_bytes() == b'{"a": "\\u00e9"}\n{"b": 1}\n'  # ensure_ascii by default
    write_jsonl_atomic(path, [{"a": "é"}], ensure_ascii=False)
    assert path.read_bytes() == '{"a": "é"}\n'.encode("utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temporary file left
