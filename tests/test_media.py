"""record_images: the one reader of a record's `images` / `image` field."""

from __future__ import annotations

import pytest

from mmalign.data.media import record_images


@pytest.mark.parametrize("record, expected", [
    ({"images": ["a.png", "b.png"]}, ["a.png", "b.png"]),
    ({"images": ("a.png", "b.png")}, ["a.png", "b.png"]),  # a tuple becomes a list
    ({"images": "a.png"}, ["a.png"]),  # one value
    ({"image": "c.png"}, ["c.png"]),
    ({"image": {"bytes": b"x", "path": None}}, [{"bytes": b"x", "path": None}]),
    ({"images": ["a.png"], "image": "c.png"}, ["a.png"]),  # `images` wins
    ({"images": None}, []),
    ({"image": None}, []),
    ({"prompt": "p"}, []),
    ({"images": []}, []),
])
def test_record_images(record, expected):
    assert record_images(record) == expected


def test_record_images_returns_a_new_list():
    images = ["a.png"]
    out = record_images({"images": images})
    out.append("b.png")
    assert images == ["a.png"]


def test_null_images_are_an_error_of_the_vlm_builders_input(tmp_path):
    """Before the shared reader, the builders read a null field as [None] and failed on it
    later; they still refuse it, now when the file is read."""
    from mmalign.builders.corrupt import read_prompt_records
    from mmalign.errors import DataError

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "images": ["a.png"]}\n{"prompt": "q", "image": null}\n')
    with pytest.raises(DataError, match="row 1 has no images"):
        read_prompt_records(path)
