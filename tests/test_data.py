"""Preference files: formats, validation errors naming the row, deterministic sharding."""

from __future__ import annotations

import json

import pytest

from mmalign.data.preference import DataError, StreamSampler, flatten, load_preference_data

PAIRS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]


def test_jsonl_parquet_and_datasets_folder_read_the_same(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "a.parquet")
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "hf"))
    for name in ("a.jsonl", "a.parquet", "hf"):
        records, kind = load_preference_data(tmp_path / name)
        assert kind == "pair" and records == PAIRS


def test_a_list_of_files_reads_as_one_dataset_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmalign.modalities.diffusion import data_roots

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS[:2]))
    (tmp_path / "more").mkdir()
    pq.write_table(pa.Table.from_pylist(PAIRS[2:]), tmp_path / "more" / "b.parquet")
    files = [tmp_path / "a.jsonl", tmp_path / "more" / "b.parquet"]
    records, kind = load_preference_data(files)
    assert kind == "pair" and len(records) == 5 and list(records) == PAIRS
    assert records[-1] == PAIRS[4] and records[1:3] == PAIRS[1:3]
    with pytest.raises(IndexError):
        records[5]

    class Cfg:  # relative media paths are looked up in each file's folder, in order
        class data:
            train, eval = [str(f) for f in files], ""
    assert data_roots(Cfg) == [tmp_path, tmp_path / "more"]
    # a relative image path is read from the folder that holds it; held by both folders as two
    # different files it is ambiguous, and an error rather than the first folder's file
    from PIL import Image

    from mmalign.data.media import load_image

    for k, root in enumerate(data_roots(Cfg)):
        (root / "images").mkdir()
        Image.new("RGB", (2, 2), (k, 0, 0)).save(root / "images" / "shared.png")
    Image.new("RGB", (3, 3)).save(tmp_path / "more" / "images" / "only_b.png")
    assert load_image("images/only_b.png", "row 3", data_roots(Cfg)).size == (3, 3)
    with pytest.raises(DataError, match="'images/shared.png' names different files in the data folders"):
        load_image("images/shared.png", "row 0", data_roots(Cfg))
    # the trainer's reader (load_split) gives every record its own file's folder: no ambiguity
    from mmalign.data.preference import load_split

    for k, f in enumerate(files):  # both files name images/shared.png, each meaning its own
        rows = [dict(r, images=["images/shared.png"]) for r in (PAIRS[:2], PAIRS[2:])[k]]
        f.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_split([f.with_suffix(".jsonl") for f in files])
    assert [r["_root"] for r in records] == [str(tmp_path)] * 2 + [str(tmp_path / "more")] * 3
    assert [load_image(r["images"][0], "row", r["_root"]).getpixel((0, 0))[0] for r in records] == [0, 0, 1, 1, 1]

    (tmp_path / "u.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n")
    with pytest.raises(DataError, match="different kinds of records .*a.jsonl: pair.*u.jsonl: unpaired"):
        load_preference_data([tmp_path / "a.jsonl", tmp_path / "u.jsonl"])
    with pytest.raises(DataError, match="an empty list"):
        load_preference_data([])


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "p", "chosen": "c"}], "row 0 has no column 'rejected'"),
    ([PAIRS[0], {"prompt": "p", "chosen": " ", "rejected": "r"}], "row 1 has an empty prompt or answer"),
    ([dict(PAIRS[0], soft_label=1.5)], "soft_label must be in [0, 1]"),
    ([dict(PAIRS[0], weight=float("nan"))], "not a finite number"),
    ([{"prompt": "p", "completions": ["a", "b"], "scores": [1.0]}], "2 completions but 1 scores"),
    ([{"question": "q", "answer": "a"}], "cannot tell the record format"),
])
def test_bad_rows_are_named(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    assert message in str(err.value) and "bad.jsonl" in str(err.value)


def test_corrupt_json_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_preference_data(path)


def test_flatten_puts_chosen_first_then_rejected():
    items = flatten(PAIRS[:2], "pair")
    assert [i["response"] for i in items] == ["c0", "c1", "r0", "r1"]


def test_sampler_shards_without_duplicates_or_drops():
    sampler = StreamSampler(10, seed=3)
    # 2 processes x batch 1 per micro-step, 5 micro-steps = one epoch: every example once.
    seen = [i for m in range(5) for rank in range(2) for i in sampler.micro_batch(m, 1, rank, 2)]
    assert sorted(seen) == list(range(10))
    # Same global batch with 1 process x batch 2 reads the same examples in the same order.
    single = [i for m in range(5) for i in sampler.micro_batch(m, 2, 0, 1)]
    assert single == seen
    # The next epoch is a different permutation of all examples.
    nxt = sampler.indices(10, 10)
    assert sorted(nxt) == list(range(10)) and nxt != seen
    assert StreamSampler(10, seed=3).indices(0, 10) == seen  # deterministic
