"""Validation grids of the edit families (mmalign/modalities/edit_validation.py): the grid of
`likelihood.validate` holds the edit pipeline's own outputs for the first training records' sources
and instructions at the configured seeds (QwenImageEditPipeline with true CFG and the empty negative
prompt; FluxKontextPipeline with the source sized as training sizes it), and training with
`train.validate_every` writes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusion_fixtures import build_for
from flux_kontext_fixtures import save_tiny_flux_kontext_pipeline
from qwen_image_edit_fixtures import save_tiny_qwen_image_edit_pipeline, write_edit_pairs

from mmalign.cli import main
from mmalign.config import Config, from_dict
from mmalign.modalities import build_modality

ROOT = Path(__file__).resolve().parents[1]
RES = 32


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_edit_pairs(tmp_path_factory.mktemp("edit_pairs"), 4)


def grid_of(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(folder / "grid.png"), dtype=np.int16)


def direct(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    """One image of the pipeline called directly, as uint8 values (H, W, 3)."""
    with torch.no_grad():
        image = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=2, height=RES,
                     width=RES, output_type="np", **kwargs).images[0]
    return (image * 255).round().astype(np.int16)


def expected_grid(pipe, records, seeds, kwargs) -> np.ndarray:
    rows = [np.concatenate([direct(pipe, r["prompt"], s, **kwargs(r)) for s in seeds], axis=1) for r in records]
    return np.concatenate(rows, axis=0)


def test_qwen_edit_grid_is_the_edit_pipelines_own_output(pairs, tmp_path, monkeypatch):
    from PIL import Image

    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as module
    from mmalign.modalities.validation import sampling_pipeline

    original = module.calculate_dimensions  # the pipeline sizes sources to 1024²: ours, small, for speed
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: original(RES * RES, ratio))
    pipeline = save_tiny_qwen_image_edit_pipeline(tmp_path / "pipeline")
    transformer, likelihood, _ = build_modality(from_dict(Config, {
        "modality": "qwen_image_edit", "model": {"path": str(pipeline)}, "data": {"train": str(pairs)},
        "diffusion": {"resolution": RES, "validation_prompts": ["a", "b"], "validation_seeds": [0, 1],
                      "validation_steps": 2, "validation_guidance": 3.0}, "train": {"validate_every": 5}}))
    records = likelihood.conditioning.validation
    assert [r["prompt"] for r in records] == ["make it red", "make the square blue"]  # the first 2 records
    import mmalign.modalities.validation as validation

    calls, build = [], validation.sampling_pipeline

    def recording(*args, **kwargs):  # the pipeline validation builds, its calls recorded
        pipe = build(*args, **kwargs)
        original_call = type(pipe).__call__
        pipe.__class__ = type("Recorded", (type(pipe),), {
            "__call__": lambda self, **kw: calls.append(kw) or original_call(self, **kw)})
        return pipe

    monkeypatch.setattr(validation, "sampling_pipeline", recording)
    out = likelihood.validate(transformer, 1, tmp_path / "v")
    monkeypatch.setattr(validation, "sampling_pipeline", build)
    grid = grid_of(tmp_path / "v")
    assert out["validation/images"] == 4 and grid.shape == (2 * RES, 2 * RES, 3)
    layout = json.loads((tmp_path / "v" / "grid.json").read_text())
    assert layout["rows"] == ["make it red", "make the square blue"] and layout["columns"] == [0, 1]
    assert layout["sources"] == [["images/0_source.png"], ["images/1_source.png"]]
    pipe = sampling_pipeline(likelihood, transformer, processor=likelihood.conditioning.encoder.processor)
    root = pairs.parent

    def guided(record):
        return {"image": Image.open(root / record["source_image"]).convert("RGB"), "true_cfg_scale": 3.0,
                "negative_prompt": ""}

    assert np.abs(grid - expected_grid(pipe, records, [0, 1], guided)).max() <= 1
    # each call fed its record's own source, instruction and true CFG
    assert [(c["prompt"], c["true_cfg_scale"], c["negative_prompt"]) for c in calls] == [
        ("make it red", 3.0, ""), ("make it red", 3.0, ""), ("make the square blue", 3.0, ""),
        ("make the square blue", 3.0, "")]
    for call, record in zip(calls, [records[0], records[0], records[1], records[1]]):
        assert np.array_equal(np.asarray(call["image"]), np.asarray(guided(record)["image"]))


def test_kontext_grid_is_the_pipelines_own_output_and_training_writes_it(pairs, tmp_path, capsys):
    from PIL import Image

    from mmalign.modalities.validation import sampling_pipeline

    pipeline = save_tiny_flux_kontext_pipeline(tmp_path / "pipeline")
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "flux_kontext_dpo.yaml"), f"model.path={pipeline}",
                 f"data.train={pairs}", "train.max_steps=1", "train.batch_size=2", f"train.output_dir={run}",
                 "train.progress=false", "train.tensorboard=false", "train.validate_every=1",
                 "diffusion.validation_prompts=[a]", "diffusion.validation_seeds=[0,1]",
                 "diffusion.validation_steps=2"]) == 0, capsys.readouterr().err
    found = sorted(p.relative_to(run) for p in run.rglob("grid.png"))
    assert found, "no validation grid written"
    layout = json.loads((run / found[0]).with_name("grid.json").read_text())
    assert layout["rows"] == ["make it red"] and layout["columns"] == [0, 1]

    transformer, likelihood, _ = build_for(pipeline, pairs, "flux_kontext", resolution=RES,
                                           validation_prompts=["a"], validation_seeds=[0, 1], validation_steps=2,
                                           validation_guidance=3.5)
    assert likelihood.conditioning.validation == []  # validate_every off: no records read
    likelihood.conditioning.validation = [json.loads(pairs.read_text().splitlines()[0])]
    likelihood.validate(transformer, 1, tmp_path / "v")
    grid = grid_of(tmp_path / "v")
    pipe = sampling_pipeline(likelihood, transformer)
    source = Image.open(pairs.parent / "images" / "0_source.png").convert("RGB")

    def kontext(record):  # the 32×32 source kept at 32×32, as training sizes it
        return {"image": source, "_auto_resize": False, "max_area": RES * RES, "guidance_scale": 3.5}

    assert np.abs(grid - expected_grid(pipe, likelihood.conditioning.validation, [0, 1], kontext)).max() <= 1
