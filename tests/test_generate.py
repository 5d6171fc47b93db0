"""`mmalign generate`: prompt files, per-sample seeds, same seed -> same image, resume after an
interruption (no duplicates, no gaps, outputs equal to an uninterrupted run), rank-file merge,
clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import needs_torchrun, torchrun
from mmalign.cli import main
from mmalign.data.preference import DataError
from mmalign.generate.manifest import read_manifest, sample_id
from mmalign.generate.prompts import read_prompts
from mmalign.generate.run import generate, make_options, plan, sample_seed

SDXL = "pkg://tiny_sdxl"
IMAGE_ARGS = ["--num-samples", "2", "--batch-size", "4", "--set", "num_inference_steps=2", "--no-progress"]


class Stop(Exception):
    """Stands in for a kill in the middle of a run."""


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\n\na blue square\ngreen triangle\n")
    return path


@pytest.fixture(scope="module")
def full_image_run(tmp_path_factory, prompt_file) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    assert main(["generate", "--model", SDXL, "--prompts", str(prompt_file), "--out", str(out), *IMAGE_ARGS]) == 0
    return out


def pixels(out: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(out / row["path"]))


# -- prompt files -----------------------------------------------------------------------------
def test_prompt_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n  two  \n")
    assert read_prompts(tmp_path / "a.txt") == [{"prompt": "one"}, {"prompt": "two"}]
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\nbond\tAbstract\nan owl\tAnimals\n")  # PartiPrompts layout
    assert read_prompts(tmp_path / "p.tsv") == [{"prompt": "bond"}, {"prompt": "an owl"}]
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "describe", "images": ["img.png"], "id": 7}) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == [
        {"prompt": "describe", "images": [str((tmp_path / "img.png").resolve())], "prompt_id": 7}]


@pytest.mark.parametrize("name, text, message", [
    ("c.csv", "text,score\nhello,1\n", "no 'prompt' .*columns: text, score"),
    ("e.txt", "\n\n", "no prompts"),
    ("b.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("m.jsonl", '{"prompt": "ok", "images": ["missing.png"]}\n', "line 1: image not found"),
    ("x.parquet", "", "unknown prompt file type"),
])
def test_prompt_file_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_prompts(tmp_path / name)
    with pytest.raises(DataError, match="not found"):
        read_prompts(tmp_path / "nope.txt")


# -- seeds --------------------------------------------------------------------------------------
def test_sample_seeds_are_fixed_and_independent_of_n(prompt_file, tmp_path):
    digest = hashlib.sha256(b"5:2:1").digest()
    assert sample_seed(5, 2, 1) == int.from_bytes(digest[:4], "big") >> 1
    seeds = {sample_seed(s, i, j) for s in range(3) for i in range(10) for j in range(10)}
    assert len(seeds) == 300 and all(0 <= x < 2**31 for x in seeds)
    two = plan(make_options({"model": "m", "prompts": str(prompt_file), "out": str(tmp_path), "num_samples": 2}))
    three = plan(make_options({"model": "m", "prompts": str(prompt_file), "out": str(tmp_path), "num_samples": 3}))
    assert list(two) == [sample_id(i, j) for i in range(3) for j in range(2)]
    assert all(three[k]["seed"] == v["seed"] for k, v in two.items())


# -- images: same seed -> same image; resume ---------------------------------------------------
def test_image_manifest(full_image_run):
    rows = read_manifest(full_image_run)
    assert [r["id"] for r in rows] == [sample_id(i, j) for i in range(3) for j in range(2)]
    assert rows[2]["prompt"] == "a blue square" and rows[2]["seed"] == sample_seed(0, 1, 0)
    assert rows[0]["params"] == {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 16, "width": 16}
    assert all(r["kind"] == "image" and r["model"] == SDXL for r in rows)
    assert pixels(full_image_run, rows[0]).shape == (16, 16, 3)
    assert not np.array_equal(pixels(full_image_run, rows[0]), pixels(full_image_run, rows[1]))  # seeds differ


def test_resume_after_interruption_equals_uninterrupted(full_image_run, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", SDXL, "--prompts", str(prompt_file), "--out", str(out), *IMAGE_ARGS]
    opts = make_options({"model": SDXL, "prompts": str(prompt_file), "out": str(out), "num_samples": 2,
                         "batch_size": 4, "progress": False, "sampling": {"num_inference_steps": 2}})
    written = []

    def kill_after_three(row):
        written.append(row["id"])
        if len(written) == 3:
            raise Stop

    with pytest.raises(Stop):
        generate(opts, on_row=kill_after_three)
    assert [r["id"] for r in read_manifest(out)] == written
    # what a kill can also leave: a torn last line, and a sample whose PNG is gone
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"id": "000002-000", "prompt_in')
    (out / "media" / f"{written[0]}.png").unlink()
    capsys.readouterr()
    assert main(["generate", *args]) == 0
    assert "4 generated, 2 reused, 0 failed" in capsys.readouterr().out
    full, resumed = read_manifest(full_image_run), read_manifest(out)
    assert [r["id"] for r in resumed] == [r["id"] for r in full]  # no duplicates, no gaps, id order
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items()} == b
        assert np.array_equal(pixels(full_image_run, a), pixels(out, b)), a["id"]  # same seed -> same image
    assert main(["generate", *args]) == 0
    assert "0 generated, 6 reused" in capsys.readouterr().out


def test_max_samples_then_rank_files_merge(full_image_run, prompt_file, tmp_path, capsys):
    """A capped run, then manifest.rank<k>.jsonl files as a killed 2-process run leaves them:
    the next run merges them and generates only what is missing."""
    out = tmp_path / "out"
    args = ["--model", SDXL, "--prompts", str(prompt_file), "--out", str(out), *IMAGE_ARGS]
    assert main(["generate", *args, "--max-samples", "4"]) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4
    (out / "manifest.jsonl").unlink()
    (out / "manifest.rank0.jsonl").write_text("\n".join(lines[0::2]) + "\n")
    (out / "manifest.rank1.jsonl").write_text("\n".join(lines[1::2]) + "\n" + lines[1][:20])  # torn tail
    capsys.readouterr()
    assert main(["generate", *args]) == 0
    assert "2 generated, 4 reused" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest.jsonl"]
    assert read_manifest(out) == read_manifest(full_image_run)


def test_same_seed_same_image_whatever_the_batch(full_image_run):
    from mmalign.generate.images import generate_images, image_params, load_pipeline

    pipe = load_pipeline(Path(__file__).parents[1] / "mmalign" / "data" / "tiny_sdxl")
    params = image_params(pipe, {"num_inference_steps": 2})
    rows = read_manifest(full_image_run)
    alone = generate_images(pipe, [rows[3]["prompt"]], [rows[3]["seed"]], params)[0]
    mixed = generate_images(pipe, ["x", rows[3]["prompt"]], [1, rows[3]["seed"]], params)[1]
    assert np.array_equal(np.asarray(alone), pixels(full_image_run, rows[3]))
    assert np.array_equal(np.asarray(mixed), pixels(full_image_run, rows[3]))


# -- errors ------------------------------------------------------------------------------------
def test_refuses_to_mix_other_parameters(full_image_run, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(full_image_run, out)
    args = ["--model", SDXL, "--prompts", str(prompt_file), "--out", str(out), *IMAGE_ARGS]
    assert main(["generate", *args, "--set", "guidance_scale=2"]) == 2
    assert "another model, sampling parameters or seed" in capsys.readouterr().err
    assert main(["generate", *args, "--set", "guidnce_scale=2"]) == 2
    assert "unknown sampling parameter 'guidnce_scale'" in capsys.readouterr().err


def test_user_errors(prompt_file, tmp_path, capsys):
    base = ["--prompts", str(prompt_file), "--out", str(tmp_path / "o")]
    assert main(["generate", "--model", str(tmp_path / "missing"), *base]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["generate", "--model", SDXL, *base, "--kind", "audio"]) == 2
    assert "audio generation needs a diffusers pipeline folder" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(f"model: {SDXL}\nnum_sample: 2\n")
    assert main(["generate", "--config", str(tmp_path / "c.yaml"), *base]) == 2
    assert "unknown config key 'num_sample'; did you mean 'num_samples'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), *base]) == 2
    assert "neither a diffusers pipeline folder nor a transformers model folder" in capsys.readouterr().err


# -- text --------------------------------------------------------------------------------------
def test_text_resume_equals_uninterrupted(tiny_lm_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"scene : {s} . describe :"}) + "\n"
                               for s in ("cat", "cup ball", "lamp")))
    data = {"model": str(tiny_lm_dir), "prompts": str(prompts), "num_samples": 3, "batch_size": 4,
            "progress": False, "sampling": {"temperature": 3.0, "max_new_tokens": 8}}
    full = generate(make_options({**data, "out": str(tmp_path / "full")}))
    assert full["generated"] == 9
    out = str(tmp_path / "cut")
    assert generate(make_options({**data, "out": out, "max_samples": 5, "batch_size": 2}))["generated"] == 5
    assert generate(make_options({**data, "out": out}))["generated"] == 4
    a, b = read_manifest(tmp_path / "full"), read_manifest(out)
    assert a == b
    assert a[0]["kind"] == "text" and a[0]["params"]["temperature"] == 3.0
    assert len({r["text"] for r in a}) > 3  # temperature 3: the samples differ


@needs_torchrun
def test_two_processes_equal_one(tiny_lm_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("scene : cat . describe :\nscene : cup ball . describe :\nscene : lamp . describe :\n")
    common = ["generate", "--model", str(tiny_lm_dir), "--prompts", str(prompts), "--num-samples", "3",
              "--batch-size", "2", "--set", "temperature=3", "--set", "max_new_tokens=6", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    run = torchrun([*common, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "9 generated, 0 reused, 0 failed" in run.stdout
    assert sorted(p.name for p in (tmp_path / "two").glob("manifest*")) == ["manifest.jsonl"]
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert [{k: v for k, v in r.items() if k != "model"} for r in one] == \
           [{k: v for k, v in r.items() if k != "model"} for r in two]


def test_vlm_prompts_with_images(tmp_path):
    """A VLM folder is detected (processor with an image processor); rows keep the condition
    images and hold the answer `generate_answers` gives for that seed."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.generate.text import generate_answers
    from mmalign.toyvlm import draw_shape, save_tiny_llava

    model_dir = save_tiny_llava(tmp_path / "llava")
    draw_shape("red", "circle").save(tmp_path / "c.png")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "describe the image .", "images": ["c.png"], "id": "q1"}) + "\n")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                 "--num-samples", "2", "--set", "max_new_tokens=3", "--no-progress"]) == 0
    rows = read_manifest(out)
    assert [r["images"] for r in rows] == [[str((tmp_path / "c.png").resolve())]] * 2
    assert rows[0]["prompt_id"] == "q1" and rows[0]["kind"] == "text"
    model, processor = AutoModelForImageTextToText.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    expected = generate_answers(model, processor, [{"prompt": "describe the image .", "images": [tmp_path / "c.png"]}],
                                max_new_tokens=3, do_sample=True, seeds=[rows[1]["seed"]])
    assert rows[1]["text"] == expected[0]


def test_manifest_writer_keeps_a_complete_row_without_newline(tmp_path):
    """read_manifest counts a complete last row that lacks its newline; the writer must keep it
    too (it used to drop it, losing a sample that resume had counted as done)."""
    from mmalign.generate.manifest import ManifestWriter

    row = {"id": "000000-000", "prompt_index": 0, "prompt": "p", "sample": 0, "seed": 1, "kind": "text", "text": "t"}
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "000000-001"}))
    with ManifestWriter(path) as writer:
        writer.write({**row, "id": "000000-002"})
    assert [r["id"] for r in read_manifest(path)] == ["000000-000", "000000-001", "000000-002"]
    path.write_text(json.dumps(row) + "\n" + '{"id": "000000-001", "pro')  # torn: dropped
    ManifestWriter(path).close()
    assert path.read_text() == json.dumps(row) + "\n"
