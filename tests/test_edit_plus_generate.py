"""Multi-source edit sampling: `mmalign generate` of a tiny QwenImageEditPlusPipeline on prompt records
{"prompt", "source_images": [a, b]} (each sample equals the pipeline called by hand with both sources
and its seed, and differs from the pipeline given only the first), a resumed run equal to the
uninterrupted one, the one-source pipelines refusing several sources with a line naming the sample
and the pipeline, and generate -> score -> build-pairs -> one training step of qwen_image_edit_plus."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusion_fixtures import write_image
from qwen_image_edit_fixtures import save_tiny_qwen_image_edit_pipeline

from mmalign.cli import main
from mmalign.errors import DataError
from mmalign.generate.manifest import read_manifest
from mmalign.generate.run import generate, make_options

ROOT = Path(__file__).resolve().parents[1]
RES = 64  # the pipeline's source areas scaled to 64²: VL images 24² -> 32×32, VAE images 64² (or 96×32)
SAMPLING = {"num_inference_steps": 2, "height": RES, "width": RES}
SCORER = """import numpy as np
from PIL import Image


def redness(conditions, outputs):
    return [float(np.asarray(Image.open(path).convert("RGB"))[..., 0].mean()) for path in outputs]
"""


class Stop(Exception):
    """Stands in for a kill in the middle of a run."""


@pytest.fixture(scope="module")
def areas():
    """QwenImageEditPlusPipeline sizes sources to 384² (VL) and 1024² (VAE) pixels; the family at
    resolution R to those times (R / 1024)²: the pipeline at R = 64 (kept for the whole module)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "CONDITION_IMAGE_SIZE", round(RES * RES * 384 * 384 / 1024 ** 2))
        patch.setattr(module, "VAE_IMAGE_SIZE", RES * RES)
        yield


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_qwen_image_edit_pipeline(tmp_path_factory.mktemp("plus") / "pipeline",
                                              pipeline="QwenImageEditPlusPipeline")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Two instructions about two sources each (64×64 and 96×48, paths relative to the prompt file) and
    one with a single `source_image`."""
    root = tmp_path_factory.mktemp("prompts")
    (root / "src").mkdir()
    for name, (w, h) in {"a": (64, 64), "b": (96, 48), "c": (64, 64), "d": (96, 48)}.items():
        write_image(root / "src" / f"{name}.png", w, h, seed=ord(name))
    rows = [{"prompt": "make it red", "source_images": ["src/a.png", "src/b.png"]},
            {"prompt": "add a star", "source_images": ["src/c.png", "src/d.png"]},
            {"prompt": "remove the circle", "source_image": "src/c.png"}]
    path = root / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(pipeline: Path, prompts: Path, out: Path, **extra):
    return make_options({"model": str(pipeline), "prompts": str(prompts), "out": str(out), "num_samples": 2,
                         "batch_size": 4, "seed": 3, "progress": False, "sampling": SAMPLING, **extra})


@pytest.fixture(scope="module")
def full_run(areas, pipeline, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "samples"
    assert generate(options(pipeline, prompts, out))["generated"] == 6
    return out


def pixels(folder: Path, row: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(folder / row["path"]).convert("RGB"))


def test_each_sample_is_the_plus_pipeline_on_all_its_sources(full_run, pipeline):
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    rows = read_manifest(full_run)
    assert [[Path(s).name for s in r["source_images"]] for r in rows[:4]] == [["a.png", "b.png"]] * 2 + [
        ["c.png", "d.png"]] * 2
    assert [Path(r["source_image"]).name for r in rows[4:]] == ["c.png", "c.png"] and "source_images" not in rows[4]
    assert not np.array_equal(pixels(full_run, rows[0]), pixels(full_run, rows[1]))  # seeds differ
    pipe = QwenImageEditPlusPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)

    def by_hand(row: dict, paths: list[str]) -> np.ndarray:
        sources = [Image.open(p).convert("RGB") for p in paths]
        with torch.no_grad():
            out = pipe(prompt=[row["prompt"]], image=sources, generator=[torch.Generator().manual_seed(row["seed"])],
                       output_type="np", **SAMPLING).images[0]
        return (out * 255).round().astype(np.uint8)

    for row in (rows[1], rows[2], rows[5]):
        paths = row.get("source_images", [row.get("source_image")])
        assert np.array_equal(pixels(full_run, row), by_hand(row, paths)), row["id"]
    assert not np.array_equal(pixels(full_run, rows[1]), by_hand(rows[1], rows[1]["source_images"][:1]))


def test_resume_after_interruption_equals_uninterrupted(full_run, pipeline, prompts, tmp_path, capsys):
    out = tmp_path / "samples"
    written = []

    def kill_after_three(row):
        written.append(row["id"])
        if len(written) == 3:
            raise Stop

    with pytest.raises(Stop):
        generate(options(pipeline, prompts, out), on_row=kill_after_three)
    assert [r["id"] for r in read_manifest(out)] == written
    (out / "media" / f"{written[0]}.png").unlink()  # a sample whose PNG a kill left unwritten
    result = generate(options(pipeline, prompts, out))
    assert (result["generated"], result["reused"], result["failed"]) == (4, 2, 0)
    full, resumed = read_manifest(full_run), read_manifest(out)
    assert [r["id"] for r in resumed] == [r["id"] for r in full]
    for a, b in zip(full, resumed):
        assert a == b
        assert np.array_equal(pixels(full_run, a), pixels(out, b)), a["id"]


@pytest.mark.parametrize("name", ["QwenImageEditPipeline", "FluxKontextPipeline"])
def test_one_source_pipelines_refuse_several_sources(name):
    from mmalign.generate.images import edit_sources

    items = [{"id": "000000-000", "source_image": "a.png"}, {"id": "000001-001", "source_images": ["a.png", "b.png"]}]
    with pytest.raises(DataError) as raised:
        edit_sources(items, name)
    assert str(raised.value) == (f"sample 000001-001: 2 source images; {name} takes one per prompt "
                                 "(several per prompt: QwenImageEditPlusPipeline)")
    assert edit_sources(items[:1], name) == [["a.png"]]
    assert edit_sources(items, "QwenImageEditPlusPipeline") == [["a.png"], ["a.png", "b.png"]]
    with pytest.raises(DataError, match="sample 000000-001: no source image"):
        edit_sources([items[0], {"id": "000000-001"}], "QwenImageEditPlusPipeline")


def test_qwen_image_edit_refuses_a_multi_source_prompt_file(pipeline, prompts, tmp_path, capsys):
    """The same folder as a QwenImageEditPipeline on the two-source prompts: each sample reported
    (the run goes on and fails), none generated."""
    from mmalign.export import write_model_index

    single = tmp_path / "edit"
    shutil.copytree(pipeline, single)
    write_model_index(single, "QwenImageEditPipeline")
    two = tmp_path / "two.jsonl"
    lines = prompts.read_text().splitlines(keepends=True)[:2]  # the two-source records, paths made absolute
    two.write_text("".join(lines).replace('"src/', f'"{prompts.parent}/src/'))
    code = main(["generate", "--model", str(single), "--prompts", str(two), "--out", str(tmp_path / "s"),
                 "--num-samples", "1", "--set", "num_inference_steps=2", "--set", "height=32", "--set", "width=32"])
    out = capsys.readouterr().out
    assert code == 1 and "0 generated, 0 reused, 2 failed (first failure: 000000-000: sample 000000-000: 2 source " \
                          "images; QwenImageEditPipeline takes one per prompt" in out
    assert not (tmp_path / "s" / "manifest.jsonl").read_text().strip()


def test_generate_score_build_pairs_and_train_edit_plus(full_run, tmp_path):
    samples = tmp_path / "samples"
    shutil.copytree(full_run, samples)
    scorer = tmp_path / "rewards.py"
    scorer.write_text(SCORER)
    assert main(["score", str(samples), "--scorer", f"python:{scorer}:redness"]) == 0
    assert main(["build-pairs", "scores", str(samples), "--out", str(tmp_path / "pairs")]) == 0
    pairs = [json.loads(line) for line in open(tmp_path / "pairs" / "pairs.jsonl")]
    rows = {r["id"]: r for r in read_manifest(samples)}
    assert len(pairs) == 3
    for index, pair in enumerate(pairs):
        chosen, rejected = pair["ids"]
        assert rows[chosen]["score"] > rows[rejected]["score"]
        originals = rows[chosen].get("source_images", [rows[chosen].get("source_image")])
        copied = pair["source_images"] if index < 2 else [pair["source_image"]]
        assert copied == [f"images/pairs-{index:06d}-source{k}.png" for k in range(len(originals))]
        for path, original in zip(copied, originals, strict=True):
            assert (tmp_path / "pairs" / path).read_bytes() == Path(original).read_bytes()
    two = tmp_path / "pairs" / "two.jsonl"  # the two-source pairs: one grid combination, one batch
    two.write_text("".join(json.dumps(p) + "\n" for p in pairs[:2]))
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "qwen_image_edit_dpo.yaml"), "modality=qwen_image_edit_plus",
                 f"model.path={rows[chosen]['model']}", f"data.train={two}", f"diffusion.resolution={RES}",
                 "train.max_steps=1", "train.batch_size=2", f"train.output_dir={run}", "train.progress=false",
                 "train.tensorboard=false", "train.log_every=1"]) == 0
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
