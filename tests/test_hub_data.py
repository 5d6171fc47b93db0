"""Hub dataset ids in data.train (mmalign/data/hub_data.py): dataset repos built here in
huggingface_hub's cache layout (datasets--ORG--NAME/{refs,snapshots}), read with HF_HUB_OFFLINE=1
through `datasets`, streamed or whole, and mapped by the Pick-a-Pic / RLAIF-V readers."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mmalign.data.hub_data import DataSpec, parse_data_id
from mmalign.data.preference import load_preference_data, load_split
from mmalign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MAIN, V2 = "c" * 40, "d" * 40


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def pickapic_table(n: int):
    """n Pick-a-Pic v2 rows (exact schema): label_0 cycles 1, 0, 0.5 (a tie), jpg_0 red, jpg_1 blue."""
    import pyarrow as pa

    from mmalign.data.pickapic import v2_schema

    labels = [(1.0, 0.0, 0.5)[i % 3] for i in range(n)]
    cols = {"are_different": [True] * n, "best_image_uid": [f"b{i}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)], "created_at": [0] * n, "has_label": [True] * n,
            "image_0_uid": [f"u0-{i}" for i in range(n)], "image_0_url": [""] * n,
            "image_1_uid": [f"u1-{i}" for i in range(n)], "image_1_url": [""] * n,
            "jpg_0": [png((200, 10 * i, 0)) for i in range(n)], "jpg_1": [png((0, 10 * i, 200)) for i in range(n)],
            "label_0": labels, "label_1": [1 - x for x in labels], "model_0": ["m0"] * n, "model_1": ["m1"] * n,
            "ranking_id": list(range(n)), "user_id": [7] * n, "num_example_per_prompt": [1] * n}
    return pa.table(cols, schema=v2_schema())


def rlaif_table(n: int):
    """RLAIF-V rows: `image` as the HF Image feature stores it ({"bytes", "path"}), question with a placeholder."""
    import pyarrow as pa

    return pa.table({"ds_name": ["toy"] * n, "image": [{"bytes": png((i, 0, 0)), "path": None} for i in range(n)],
                     "question": [f"<image>\nWhat is {i}?" for i in range(n)],
                     "chosen": [f"It is {i}." for i in range(n)], "rejected": [f"It is {i + 1}." for i in range(n)],
                     "origin_dataset": ["x"] * n, "origin_split": ["y"] * n, "idx": list(range(n)),
                     "image_path": [f"{i}.png" for i in range(n)]})


def add_dataset(cache: Path, repo: str, commit: str, refs: tuple[str, ...], files: dict[str, object]) -> Path:
    import pyarrow.parquet as pq

    storage = cache / f"datasets--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, table in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, snapshot / name)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_data(tmp_path, monkeypatch):
    """tinyorg/pickapic (train 9 rows, validation 3; at v2 train has 6), tinyorg/rlaif (train 5); network off."""
    cache = tmp_path / "hub"
    main = add_dataset(cache, "tinyorg/pickapic", MAIN, ("main",),
                       {"data/train-00000-of-00001.parquet": pickapic_table(9),
                        "data/validation-00000-of-00001.parquet": pickapic_table(3)})
    add_dataset(cache, "tinyorg/pickapic", V2, ("v2",), {"data/train-00000-of-00001.parquet": pickapic_table(6)})
    add_dataset(cache, "tinyorg/rlaif", MAIN, ("main",), {"data/train-00000-of-00001.parquet": rlaif_table(5)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    return {"cache": cache, "train_file": main / "data/train-00000-of-00001.parquet"}


def test_parse_data_ids():
    assert parse_data_id("yuvalkirstain/pickapic_v2") == DataSpec("yuvalkirstain/pickapic_v2")
    assert parse_data_id("openbmb/RLAIF-V-Dataset@abc1:train") == DataSpec("openbmb/RLAIF-V-Dataset", "abc1")
    assert parse_data_id("o/n:sub:validation[:200]") == DataSpec("o/n", None, "sub", "validation", "[:200]")
    for local in ("pairs/train.jsonl", "runs/x/pairs.jsonl", "a/b.parquet", "./a/b", "/abs/path", "o/n:bad split"):
        assert parse_data_id(local) is None, local


def _plain(records) -> list[dict]:
    return [{k: v for k, v in records[i].items() if k != "source"} for i in range(len(records))]


def test_pickapic_by_hub_id_equals_the_local_shard(hub_data, capsys):
    """auto picks the Pick-a-Pic reader from the columns; the records (ties dropped, winner
    first) are those of the same parquet file read as a local path."""
    local, _ = load_preference_data(hub_data["train_file"], format="pickapic")
    records, kind = load_preference_data("tinyorg/pickapic")
    assert kind == "pair" and len(records) == len(local) == 6  # 9 rows - 3 ties
    assert _plain(records) == _plain(local)
    assert records[1]["chosen"] == png((0, 10, 200)) and records[1]["rejected"] == png((200, 10, 0))  # row 1: label_0 = 0
    v2, _ = load_preference_data("tinyorg/pickapic@v2:train", format="pickapic")
    val, _ = load_preference_data("tinyorg/pickapic:validation")
    sliced, _ = load_preference_data("tinyorg/pickapic:train[:4]")
    assert (len(v2), len(val), len(sliced)) == (4, 2, 3)
    streamed, _ = load_preference_data("tinyorg/pickapic", streaming=4)
    assert _plain(streamed) == _plain(sliced)  # the first 4 rows of the stream
    assert "pick-a-pic: 6 pairs kept from 9 rows (3 ties dropped" in capsys.readouterr().out


def test_rlaif_v_by_hub_id_maps_the_columns(hub_data):
    records, kind = load_preference_data("tinyorg/rlaif", streaming=3)
    assert kind == "pair" and len(records) == 3
    r = records[2]
    assert (r["prompt"], r["chosen"], r["rejected"], r["idx"]) == ("What is 2?", "It is 2.", "It is 3.", 2)
    assert r["images"] == [{"bytes": png((2, 0, 0)), "path": None}]
    whole, _ = load_split("tinyorg/rlaif")
    assert len(whole) == 5 and whole[2]["prompt"] == "What is 2?"


def test_missing_id_is_one_line_naming_what_was_tried(hub_data, capsys):
    from mmalign.cli import main

    for name, rev in (("tinyorg/nothing", ""), ("tinyorg/pickapic@v9", " at revision 'v9'")):
        with pytest.raises(ConfigError) as e:
            load_preference_data(name)
        text = str(e.value)
        assert f"data {name!r}: no local file or folder" in text and "HF_HUB_OFFLINE=1" in text
        assert f"Hub dataset {name.split('@')[0]!r}{rev} cannot be had" in text
    with pytest.raises(ConfigError, match="Unknown split \"nope\""):
        load_preference_data("tinyorg/pickapic:nope")
    with pytest.raises(ConfigError, match="data.streaming takes a row count"):
        load_preference_data("tinyorg/pickapic", streaming=True)
    capsys.readouterr()
    assert main(["train", str(ROOT / "configs/tiny/lm_dpo.yaml"), "data.train=nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "Hub dataset 'nobody/nothing' cannot be had" in err.splitlines()[-1]


def test_train_one_step_from_a_streamed_hub_dataset(hub_data, tmp_path):
    from mmalign.cli import main

    out = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/tiny/sdxl_dpo.yaml"), "data.train=tinyorg/pickapic",
                 "data.streaming=6", "data.format=auto", "train.max_steps=1", "train.batch_size=2",
                 f"train.output_dir={out}", "train.progress=false"]) == 0
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 1 and losses[0] > 0


def test_online_ids_go_to_load_dataset_with_revision_subset_and_streaming(monkeypatch):
    """With the network on, the id itself goes to `datasets.load_dataset` (which downloads into the
    user's caches); here load_dataset is replaced by a recorder that answers from memory."""
    import datasets

    calls = []

    def load_dataset(path, name=None, *, split, revision, streaming, cache_dir):
        calls.append((path, name, split, revision, streaming))
        table = datasets.Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "chosen": ["a", "b", "c"],
                                            "rejected": ["x", "y", "z"]})
        return table.to_iterable_dataset() if streaming else table

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records, kind = load_preference_data("someorg/prefs@v3:cfg:test")
    assert kind == "pair" and [r["prompt"] for r in records] == ["p0", "p1", "p2"]
    streamed, _ = load_preference_data("someorg/prefs", streaming=2)
    assert [r["chosen"] for r in streamed] == ["a", "b"]
    assert calls == [("someorg/prefs", "cfg", "test", "v3", False), ("someorg/prefs", None, "train", None, True)]


def test_streaming_key_is_checked_at_load():
    from mmalign.config import load_config

    with pytest.raises(ConfigError, match="data.streaming must be >= 0"):
        load_config(ROOT / "configs/tiny/sdxl_dpo.yaml", ["data.streaming=-1"])
    with pytest.raises(ConfigError, match="data.streaming"):
        load_config(ROOT / "configs/tiny/sdxl_dpo.yaml", ["data.streaming=lots"])
