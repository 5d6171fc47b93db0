"""`mmalign generate` of Wan image-to-video (mmalign/generate/video.py) on the tiny WanImageToVideoPipeline folders
(tests/wan_fixtures.py): prompt records {"prompt", "source_image"} give, per sample seed, WanImageToVideoPipeline's
own video continuing that source (Wan 2.1 I2V with CLIP, Wan 2.2 I2V A14B), frame-exact before the mp4 and
within H.264 rounding after; a killed run resumes to the uninterrupted manifest without regenerating its
finished samples; 2 processes == 1; a prompt without a source on an I2V folder, a source on a text-to-video
folder or a changed source on resume is one line naming the sample; and generate -> score -> build-pairs ->
train reads the I2V pairs {source_image, prompt, chosen, rejected}."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_torchrun, torchrun
from diffusion_fixtures import write_image
from PIL import Image
from wan_fixtures import ROOT, save_tiny_wan_i2v_versions, save_tiny_wan_pipeline

from mmalign.cli import main
from mmalign.data.video import load_video
from mmalign.generate.manifest import read_manifest
from mmalign.generate.run import generate, make_options

SIZE = {"num_inference_steps": 2, "height": 16, "width": 32, "num_frames": 5, "guidance_scale": 3.0}
SAMPLING = [arg for key, value in SIZE.items() for arg in ("--set", f"{key}={value}")]
LUMA = np.array([0.299, 0.587, 0.114])  # H.264 keeps luma at full size (yuv420p halves the chroma)
SCORER = """import numpy as np

from mmalign.data.video import load_video


def redness(conditions, outputs):  # outputs: the samples' mp4 paths
    return [float(np.mean([np.asarray(f)[..., 0].mean() for f in load_video(str(p), "redness")])) for p in outputs]
"""


class Stop(Exception):
    """Stands in for a kill in the middle of a run."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_i2v_generate")
    return save_tiny_wan_i2v_versions(root)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Two prompts continuing two sources of other shapes than the 16 x 32 videos (the pipeline squashes them,
    as training squashes to resolution x width), paths relative to the prompt file."""
    root = tmp_path_factory.mktemp("i2v_prompts")
    (root / "src").mkdir()
    write_image(root / "src" / "a.png", 40, 24, seed=1)
    write_image(root / "src" / "b.png", 32, 32, seed=2)
    rows = [{"prompt": "a red circle moving right", "source_image": "src/a.png"},
            {"prompt": "a blue square moving left", "source_image": "src/b.png"}]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(folder, prompts, out, **kw):
    return make_options({"model": str(folder), "prompts": str(prompts), "out": str(out), "num_samples": 2,
                         "batch_size": 4, "seed": 5, "progress": False, "sampling": dict(SIZE), **kw})


@pytest.fixture(scope="module")
def runs(folders, prompts, tmp_path_factory):
    """One uninterrupted run per folder: {version: out folder}."""
    root = tmp_path_factory.mktemp("i2v_runs")
    for version, folder in folders.items():
        assert generate(options(folder, prompts, root / version))["generated"] == 4
    return {version: root / version for version in folders}


def pipeline_video(folder, row):
    """WanImageToVideoPipeline.from_pretrained(folder) on the row's source, prompt and seed, sampled alone:
    uint8 (F, H, W, 3)."""
    from diffusers import WanImageToVideoPipeline

    from mmalign.generate.video import to_uint8

    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        frames = pipe(image=Image.open(row["source_image"]).convert("RGB"), prompt=[row["prompt"]],
                      generator=[torch.Generator().manual_seed(row["seed"])], output_type="np", **SIZE).frames
    return to_uint8(frames[0])


def decoded_luma(out, row):
    return np.stack([np.asarray(f, dtype=np.float64) @ LUMA for f in load_video(str(out / row["path"]), row["id"])])


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_videos_are_the_i2v_pipelines_own_for_their_source_and_seed(folders, runs, version):
    from mmalign.generate.images import load_pipeline
    from mmalign.generate.video import generate_i2v_videos

    rows = read_manifest(runs[version])
    assert [Path(r["source_image"]).name for r in rows] == ["a.png", "a.png", "b.png", "b.png"]
    assert all(r["kind"] == "video" and r["path"].endswith(".mp4") for r in rows)
    assert rows[0]["params"]["height"] == 16 and rows[0]["params"]["width"] == 32
    # the batch as run() samples it: both sources in one batch, one pipeline call per source
    pipe = load_pipeline(folders[version])
    ours = generate_i2v_videos(pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows], SIZE,
                               [r["source_image"] for r in rows])
    for row, video in zip((rows[1], rows[2]), (ours[1], ours[2])):
        expected = pipeline_video(folders[version], row)
        assert video.shape == (5, 16, 32, 3)
        assert np.abs(video.astype(np.int16) - expected).max() <= 1, row["id"]  # frame-exact up to uint8 rounding
    errors = [float(np.abs(decoded_luma(runs[version], r) - v @ LUMA).mean()) for r, v in zip(rows, ours)]
    assert max(errors) < 4  # crf 18 rounding
    other = generate_i2v_videos(pipe, [rows[0]["prompt"]], [rows[0]["seed"]], SIZE, [rows[2]["source_image"]])[0]
    print("another source, same prompt and seed: mean |diff|", np.abs(other.astype(np.int16) - ours[0]).mean())
    assert np.abs(other.astype(np.int16) - ours[0]).max() > 1  # another source: another video


def test_a_killed_run_resumes_without_regenerating_finished_samples(folders, prompts, runs, tmp_path, capsys):
    out, written = tmp_path / "out", []

    def kill_after_two(row):
        written.append(row["id"])
        if len(written) == 2:
            raise Stop

    with pytest.raises(Stop):
        generate(options(folders["2.1"], prompts, out, batch_size=1), on_row=kill_after_two)
    finished = {i: (out / "media" / f"{i}.mp4").stat().st_mtime_ns for i in written}
    args = ["generate", "--model", str(folders["2.1"]), "--prompts", str(prompts), "--out", str(out),
            "--num-samples", "2", "--batch-size", "4", "--seed", "5", "--no-progress", *SAMPLING]
    capsys.readouterr()
    assert main(args) == 0
    assert "2 generated, 2 reused, 0 failed" in capsys.readouterr().out
    assert {i: (out / "media" / f"{i}.mp4").stat().st_mtime_ns for i in written} == finished  # not rewritten
    full, resumed = read_manifest(runs["2.1"]), read_manifest(out)
    assert resumed == full
    for row in full:
        assert np.array_equal(decoded_luma(runs["2.1"], row), decoded_luma(out, row)), row["id"]
    moved = prompts.parent / "moved.jsonl"  # the same prompts, another first frame for prompt 1
    moved.write_text(prompts.read_text().replace("src/b.png", "src/a.png"))
    assert main([*args[:4], str(moved), *args[5:]]) == 2
    assert "sample 000001-000 was made from source_image" in capsys.readouterr().err


@needs_torchrun
def test_two_processes_equal_one(folders, prompts, runs, tmp_path):
    """The same manifest rows (ids, seeds, sources, params) and the same videos up to float rounding, far below
    another seed's video. Measured: a torchrun process's uint8 frames differ from a plain process's by at most
    1 level in 1 of 7,680 values (not always the same sample from run to run: float rounding of the CPU kernels,
    also with one process under torchrun), which H.264 lifts to 0.14 luma levels on average over that video."""
    run = torchrun(["generate", "--model", str(folders["2.2"]), "--prompts", str(prompts), "--out",
                    str(tmp_path / "two"), "--num-samples", "2", "--batch-size", "4", "--seed", "5", "--no-progress",
                    *SAMPLING])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 generated, 0 reused, 0 failed" in run.stdout
    assert sorted(p.name for p in (tmp_path / "two").glob("manifest*")) == ["manifest.jsonl"]
    one, two = read_manifest(runs["2.2"]), read_manifest(tmp_path / "two")
    assert one == two
    videos = [(decoded_luma(runs["2.2"], row), decoded_luma(tmp_path / "two", row)) for row in one]
    assert max(float(np.abs(a - b).mean()) for a, b in videos) < 0.5
    assert float(np.abs(videos[0][0] - videos[1][0]).mean()) > 2  # another seed, same source: another video


def test_a_prompt_and_a_pipeline_that_do_not_match_name_the_sample(folders, prompts, tmp_path, capsys):
    plain = tmp_path / "plain.txt"
    plain.write_text("a red circle moving right\n")
    common = ["--num-samples", "1", "--no-progress", *SAMPLING]
    assert main(["generate", "--model", str(folders["2.1"]), "--prompts", str(plain), "--out", str(tmp_path / "a"),
                 *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mmalign: error: {plain}: sample 000000-000: WanImageToVideoPipeline continues a first frame: "
                   "give the prompt a 'source_image'")
    t2v = save_tiny_wan_pipeline(tmp_path / "t2v")
    capsys.readouterr()
    assert main(["generate", "--model", str(t2v), "--prompts", str(prompts), "--out", str(tmp_path / "b"),
                 *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmalign: error: {prompts}: sample 000000-000: has a 'source_image' but WanPipeline is "
                          "text-to-video") and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any sampling
    assert main(["generate", "--model", str(folders["2.2"]), "--prompts", str(prompts), "--out", str(tmp_path / "c"),
                 *common, "--set", "last_image=src/b.png"]) == 2
    assert "sampling parameter 'last_image' is set by mmalign generate" in capsys.readouterr().err


def test_generate_score_build_pairs_and_train_i2v(folders, prompts, runs, tmp_path):
    import shutil

    samples = shutil.copytree(runs["2.1"], tmp_path / "samples")
    scorer = tmp_path / "rewards.py"
    scorer.write_text(SCORER)
    assert main(["score", str(samples), "--scorer", f"python:{scorer}:redness"]) == 0
    assert main(["build-pairs", "scores", str(samples), "--out", str(tmp_path / "pairs")]) == 0
    rows = {r["id"]: r for r in read_manifest(samples)}
    pairs = [json.loads(line) for line in open(tmp_path / "pairs" / "pairs.jsonl")]
    assert len(pairs) == 2
    for index, pair in enumerate(pairs):
        chosen, rejected = (rows[i] for i in pair["ids"])
        assert chosen["score"] > rejected["score"] and chosen["prompt_index"] == rejected["prompt_index"] == index
        assert pair["source_image"] == f"images/pairs-{index:06d}-source0.png"  # the first frame, copied beside
        assert (tmp_path / "pairs" / pair["source_image"]).read_bytes() == Path(chosen["source_image"]).read_bytes()
        assert pair["chosen"] == f"videos/pairs-{index:06d}-0.mp4" and pair["prompt"] == chosen["prompt"]
        assert (tmp_path / "pairs" / pair["chosen"]).read_bytes() == (samples / chosen["path"]).read_bytes()
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "wan_dpo.yaml"), f"model.path={folders['2.1']}",
                 f"data.train={tmp_path / 'pairs' / 'pairs.jsonl'}", "diffusion.random_flip=false",
                 "diffusion.width=32", "train.max_steps=1", "train.batch_size=2", f"train.output_dir={run}",
                 "train.progress=false", "train.tensorboard=false", "train.log_every=1"]) == 0
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
