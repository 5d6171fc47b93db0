"""Bad data (issue 23 item 4): every jsonl reader names the file and line for non-UTF-8 bytes and
lines that are not JSON objects; unreadable images are found at load and skipped with their file
and row; media paths may not leave the data folder; negative weights and null prompts are errors.
Each test fails on the code before the fix (raw UnicodeDecodeError / AttributeError / KeyError
tracebacks, a run stopping mid-training, an outside file read silently)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffusion_fixtures import write_pairs_file
from mmalign.config import ConfigError, load_config
from mmalign.data.media_checks import MediaPolicy
from mmalign.data.preference import load_preference_data, load_split
from mmalign.errors import DataError

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def read_preference(path):
    return load_preference_data(path)


def read_prompts(path):
    from mmalign.generate.prompts import read_prompts as read

    return read(path)


def read_manifest(path):
    from mmalign.generate.manifest import read_manifest as read

    return read(path)


def read_coco_jsonl(path):
    from mmalign.evaluation.coco import read_jsonl

    return read_jsonl(path, "answers")


def read_online_prompts(path):
    from mmalign.modalities.step_sampler import load_prompts

    return load_prompts(SimpleNamespace(prompt_list=None, prompts=str(path)), "online")


def read_round(path):
    from mmalign.online.rounds import load_round

    (path.parent / "meta.json").write_text(json.dumps({"fingerprint": "f"}))
    return load_round(path.parent, "f")


def read_metrics_report(path):
    from mmalign.report.runs import read_metrics

    return read_metrics(path)


MANIFEST_ROW = {"id": "0-0", "prompt_index": 0, "sample": 0, "prompt": "p", "seed": 1, "kind": "text",
                "text": "t"}
READERS = {  # reader, file name, a good row
    "preference": (read_preference, "train.jsonl", GOOD),
    "prompts": (read_prompts, "prompts.jsonl", {"prompt": "p"}),
    "manifest": (read_manifest, "manifest.jsonl", MANIFEST_ROW),
    "coco": (read_coco_jsonl, "answers.jsonl", {"question_id": 1}),
    "online_prompts": (read_online_prompts, "prompts.jsonl", {"prompt": "p"}),
    "online_round": (read_round, "records.jsonl", GOOD),
    "report": (read_metrics_report, "metrics.jsonl", {"step": 1}),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("bad,message", ids=["latin1", "list", "string", "null"], argvalues=[
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',
     r"line 2 is not UTF-8 text \(byte 16 of the line is b'\\xe9'\)"),
    (b'[1, 2]', r"line 2 holds a JSON list, not a JSON object"),
    (b'"just text"', r"line 2 holds a JSON string, not a JSON object"),
    (b'null', r"line 2 holds JSON null, not a JSON object"),
])
def test_every_jsonl_reader_names_file_and_line(tmp_path, reader, bad, message):
    read, name, good = READERS[reader]
    path = tmp_path / name
    path.write_bytes(json.dumps(good).encode() + b"\n" + bad + b"\n" + json.dumps(good).encode() + b"\n")
    with pytest.raises(DataError, match=rf"{path}: {message}") as err:
        read(path)
    assert "\n" not in str(err.value)


def test_a_utf8_bom_and_crlf_lines_are_read(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode() + b"\r\n")
    assert load_preference_data(path)[0] == [GOOD, GOOD]


@pytest.mark.parametrize("name,data,message", [
    ("prompts.txt", b"a cat\n\xff\xfe dog\n", r"prompts.txt: line 2 is not UTF-8 text"),
    ("prompts.csv", b"prompt\na cat\n\x80dog\n", r"prompts.csv: line 3 is not UTF-8 text"),
])
def test_text_prompt_files_name_the_line_of_bad_bytes(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_a_json_list_of_non_objects_names_the_row(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, "text"]))
    with pytest.raises(DataError, match=r"train.json: row 1 is not a JSON object"):
        load_preference_data(path)
    path.write_bytes(b'[{"prompt": "\xe9"}]')
    with pytest.raises(DataError, match=r"train.json: line 1 is not UTF-8 text"):
        load_preference_data(path)


@pytest.mark.parametrize("row,message", [
    (dict(GOOD, weight=-0.5), r"row 1: weight must be >= 0, got -0.5"),
    (dict(GOOD, prompt=None), r"row 1 has an empty prompt or answer"),
])
def test_negative_weight_and_null_prompt_name_file_and_row(tmp_path, row, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"{path}: {message}"):
        load_preference_data(path)


def test_online_null_prompt_is_an_error_not_the_text_none(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"prompt": null}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl: row 1 has no 'prompt' text \(got None\)"):
        read_online_prompts(path)  # before: the prompt "None"


def test_pickapic_null_caption_names_shard_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_pickapic import write_shard  # the tiny Pick-a-Pic shard writer of the reader's tests

    path = tmp_path / "train-0.parquet"
    write_shard(path, [(1.0, True, True, False)] * 2, "A", 2)
    table = pq.read_table(path)
    table = table.set_column(table.column_names.index("caption"), "caption", pa.array(["a cat", None], pa.string()))
    pq.write_table(table, path)
    records, _ = load_preference_data(path, format="pickapic")
    assert records[0]["prompt"] == "a cat"
    with pytest.raises(DataError, match=r"pick-a-pic train-0.parquet row 1: the caption is None, not text"):
        records[1]


# -- media -----------------------------------------------------------------------------------
IMAGES = MediaPolicy(verify="auto", allow_outside=False, outputs_are_media=True, outputs_are_images=True)


def pairs_with(tmp_path: Path, count: int, edit) -> Path:
    path, records = write_pairs_file(tmp_path / "data", count)
    edit(records, tmp_path / "data")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_an_unreadable_image_is_found_at_load_and_skipped_with_file_and_row(tmp_path, capsys):
    def corrupt(records, root):
        (root / records[2]["rejected"]).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")

    path = pairs_with(tmp_path, 4, corrupt)
    records, _ = load_split(path, media=IMAGES)
    out = capsys.readouterr().out
    assert f"skipping {path} row 2: unreadable image in rejected" in out
    assert f"{path}: 1 of 4 rows skipped (unreadable image), 3 kept" in out
    assert [r["chosen"] for r in records] == [f"images/{i}_c.png" for i in (0, 1, 3)]
    assert len(load_split(path, media=MediaPolicy(verify="none", allow_outside=False))[0]) == 4  # not checked
    with pytest.raises(DataError, match=r"no readable rows"):
        load_split(pairs_with(tmp_path / "all", 1, corrupt_all), media=IMAGES)


def corrupt_all(records, root):
    for r in records:
        (root / r["chosen"]).write_bytes(b"not an image")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_media_paths_leaving_the_data_folder_are_refused(tmp_path, how):
    secret = tmp_path / "secret.png"

    def escape(records, root):
        from diffusion_fixtures import write_image

        write_image(secret, 16, 16, seed=0)
        if how == "dotdot":
            records[1]["chosen"] = "../secret.png"
        elif how == "absolute":
            records[1]["chosen"] = str(secret)
        else:
            os.symlink(secret, root / "images" / "link.png")
            records[1]["chosen"] = "images/link.png"

    path = pairs_with(tmp_path, 2, escape)
    with pytest.raises(DataError, match=rf"{path}: row 1, chosen: media path '.*' leaves the data folder "
                                        r".*data.allow_outside_paths: true"):
        load_split(path, media=IMAGES)
    allowed = MediaPolicy(verify="all", allow_outside=True, outputs_are_media=True, outputs_are_images=True)
    assert len(load_split(path, media=allowed)[0]) == 2


def test_text_answers_are_not_taken_for_paths(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(dict(GOOD, chosen="../etc/passwd is a path")) + "\n")
    text = MediaPolicy(verify="all", allow_outside=False)  # a text family: answers are text
    assert len(load_split(path, media=text)[0]) == 1
    path.write_text(json.dumps(dict(GOOD, images=["/etc/hostname"])) + "\n")
    with pytest.raises(DataError, match=r"row 0, images\[0\]: media path '/etc/hostname' leaves"):
        load_split(path, media=text)


def test_verify_media_is_checked_at_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {verify_media: sometimes}\n")
    with pytest.raises(ConfigError, match=r"data.verify_media must be one of auto, all, none, got 'sometimes'"):
        load_config(path)


@pytest.mark.parametrize("modality,outputs,images", [("causal_lm", False, False), ("llava", False, False),
                                                    ("sdxl", True, True), ("audioldm2", True, False)])
def test_the_run_policy_follows_the_family(make_config, modality, outputs, images):
    import dataclasses

    from mmalign.data.media_checks import media_policy

    cfg = dataclasses.replace(load_config(make_config(data={"verify_media": "all"})), modality=modality)
    assert media_policy(cfg) == MediaPolicy("all", False, outputs, images)
    cfg.diffusion.cache_dir = "latents"  # a cached image run reads no images: nothing decoded at load
    assert media_policy(cfg).verify == ("none" if images else "all")


def test_the_trainer_reads_data_under_the_policy(make_config, tmp_path):
    """Through `load_run_split` (what the trainer and `mmalign cache` call): a text run refuses an
    absolute `images` path unless data.allow_outside_paths."""
    from mmalign.data.preference import load_run_split

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(dict(GOOD, images=[str(tmp_path.parent / "x.png")])) + "\n")
    with pytest.raises(DataError, match=r"row 0, images\[0\]: media path .* leaves the data folder"):
        load_run_split(load_config(make_config(data={"train": str(path)})), "train")
    cfg = load_config(make_config(data={"train": str(path), "allow_outside_paths": True, "verify_media": "none"}))
    assert len(load_run_split(cfg, "train")[0]) == 1
