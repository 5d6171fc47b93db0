"""Readers of published VLM preference datasets (mmalign.data.vlm_formats): each shipped sample
under datasets/ maps to the common record, collates through LlavaLikelihood, and a missing
column or a bad row is an error that names it."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmalign.data.media import load_image
from mmalign.data.preference import DataError, load_preference_data

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = {
    "rlhf_v": ROOT / "datasets" / "rlhf_v" / "RLHF-V-Dataset.parquet",
    "rlaif_v": ROOT / "datasets" / "rlaif_v",  # a folder of shards
    "povid": ROOT / "datasets" / "povid" / "POVID_preference_data_for_VLLMs.json",
    "mdpo": ROOT / "datasets" / "mdpo" / "vlfeedback_llava_10k.json",
    "trl_vlm": ROOT / "datasets" / "trl_vlm" / "train-*.parquet",  # a glob
}
FIRST = {  # (prompt, chosen, rejected) of row 0, from the make_sample.py scripts
    "rlhf_v": ("describe the image .", "a red circle", "a blue circle"),
    "rlaif_v": ("describe the image .", "a green triangle", "a red triangle"),
    "povid": ("describe the image .", "a red triangle", "a blue triangle"),
    "mdpo": ("what is in the image .", "a blue square", "a red square"),
}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def centre_colour(record: dict, root: Path) -> tuple[int, ...]:
    image = load_image(record["images"][0], "test", root)
    return tuple(int(c) for c in np.asarray(image)[16, 16])


@pytest.mark.parametrize("name", list(SAMPLES))
def test_samples_map_to_the_common_record(name):
    records, kind = load_preference_data(SAMPLES[name], format=name)
    assert kind == "pair" and len(records) == 4
    r = records[0]
    if name == "trl_vlm":  # chat messages kept for the prompt, answers become text
        assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"][1]["text"] == "describe the image ."
        assert (r["chosen"], r["rejected"]) == ("a yellow circle", "a green circle")
    else:
        assert (r["prompt"], r["chosen"], r["rejected"]) == FIRST[name]  # <image> placeholders removed
    assert len(r["images"]) == 1
    root = SAMPLES[name] if SAMPLES[name].is_dir() else SAMPLES[name].parent
    colour = r["chosen"].split()[1]
    assert centre_colour(r, root) == COLOURS[colour]  # the image is the one the chosen answer describes


def test_provenance_columns_are_kept():
    rlhf = load_preference_data(SAMPLES["rlhf_v"], format="rlhf_v")[0][2]
    assert rlhf["ds_name"] == "RLHF-V" and rlhf["idx"] == 2 and rlhf["image_path"] == "toy/yellow_square.png"
    assert rlhf["images"][0]["path"] == "toy/yellow_square.png" and rlhf["images"][0]["bytes"][:4] == b"\x89PNG"
    rlaif = load_preference_data(SAMPLES["rlaif_v"], format="rlaif_v")[0][1]
    assert rlaif["idx"] == "toy_1" and rlaif["origin_dataset"] == "toy_shapes"
    assert load_preference_data(SAMPLES["povid"], format="povid")[0][3]["id"] == "toy_000003"


@pytest.mark.parametrize("name", list(SAMPLES))
def test_samples_collate_through_the_llava_likelihood(name):
    from mmalign.modalities.llava import LlavaLikelihood
    from mmalign.toyvlm import build_tiny_llava_processor, build_vlm_tokenizer

    processor = build_tiny_llava_processor(build_vlm_tokenizer())
    root = SAMPLES[name] if SAMPLES[name].is_dir() else SAMPLES[name].parent
    records = load_preference_data(SAMPLES[name], format=name)[0]
    batch = LlavaLikelihood(processor, max_length=64, roots=[root]).collate([records[0], records[1]], "pair")
    ids = batch.inputs["input_ids"]
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum(-1).tolist() == [16] * 4
    expected = processor.image_processor(load_image(records[1]["images"][0], "x", root), return_tensors="pt")
    assert np.allclose(batch.inputs["pixel_values"][1].numpy(), expected["pixel_values"][0].numpy())


def test_missing_columns_are_named(tmp_path):
    table = pq.read_table(SAMPLES["rlhf_v"]).drop_columns(["text"])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: rlhf_v data has no column 'text' \(columns: ds_name, "):
        load_preference_data(tmp_path / "bad.parquet", format="rlhf_v")
    rows = json.loads(SAMPLES["mdpo"].read_text())
    del rows[2]["img_path"]
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="bad.json row 2: mdpo data has no column 'img_path'"):
        load_preference_data(tmp_path / "bad.json", format="mdpo")
    with pytest.raises(DataError, match="trl_vlm data has no column 'images' or 'image'"):
        load_preference_data(tmp_path / "bad.json", format="trl_vlm")


def test_bad_rows_are_named(tmp_path):
    table = pq.read_table(SAMPLES["rlhf_v"])
    text = table.column("text").to_pylist()
    text[1] = "{not json"
    pq.write_table(table.set_column(2, "text", pa.array(text)), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet row 1: column 'text' is not valid JSON"):
        load_preference_data(tmp_path / "bad.parquet", format="rlhf_v")
    rows = json.loads(SAMPLES["povid"].read_text())
    rows[3]["rejected_conversations"][0]["value"] = "<image>\nsomething else ."
    (tmp_path / "povid.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="povid.json row 3: conversations and rejected_conversations differ"):
        load_preference_data(tmp_path / "povid.json", format="povid")
    rows = json.loads(SAMPLES["mdpo"].read_text())
    rows[0]["chosen"] = " "
    (tmp_path / "mdpo.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="mdpo.json: row 0 has an empty prompt or answer"):
        load_preference_data(tmp_path / "mdpo.json", format="mdpo")


def test_images_as_bytes_dicts_or_paths_and_multi_turn(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nfirst ?"}, {"from": "gpt", "value": "one"},
             {"from": "human", "value": "second ?"}]
    rows = [{"image": buffer.getvalue(), "conversations": turns + [{"from": "gpt", "value": "good"}],
             "rejected_conversations": turns + [{"from": "gpt", "value": "bad"}]},
            {"image": {"bytes": None, "path": "a.png"}, "conversations": turns[:1] + [{"from": "gpt", "value": "x"}],
             "rejected_conversations": turns[:1] + [{"from": "gpt", "value": "y"}]}]
    from mmalign.data.vlm_formats import map_povid

    first = map_povid(rows[0], "row 0")
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user"]  # multi-turn kept as messages
    assert (first["chosen"], first["rejected"]) == ("good", "bad")
    assert load_image(first["images"][0], "x").getpixel((0, 0)) == (1, 2, 3)
    second = map_povid(rows[1], "row 1")
    assert second["prompt"] == "first ?" and load_image(second["images"][0], "x", tmp_path).getpixel((0, 0)) == (4, 5, 6)
    with pytest.raises(DataError, match="row 2: missing image"):
        map_povid(dict(rows[1], image=None), "row 2")


def test_mdpo_format_trains_through_the_cli(tmp_path):
    from mmalign.cli import main
    from mmalign.toyvlm import save_tiny_llava

    llava = save_tiny_llava(tmp_path / "llava")
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "llava_dpo.yaml"), f"model.path={llava}",
                 f"data.train={SAMPLES['mdpo']}", "data.format=mdpo", "data.eval=", f"train.output_dir={out}",
                 "train.max_steps=1", "train.batch_size=4", "train.progress=false", "train.tensorboard=false",
                 "train.log_every=1"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] > 0 and math.isfinite(row["loss"]) and row["rewards/margins"] == 0.0
