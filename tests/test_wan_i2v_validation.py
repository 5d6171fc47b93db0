"""Validation videos of Wan image-to-video (mmalign/families/_wan_i2v_validation.py) on tiny
WanImageToVideoPipeline folders: grid.png / grid.mp4 hold WanImageToVideoPipeline's own videos (loaded from the
folder, the trained transformer(s) swapped in) for the first training records' source images and prompts at the
configured seeds, for Wan 2.1 I2V (CLIP) and Wan 2.2 I2V A14B (two experts); another source gives another video;
`mmalign train` with `train.validate_every` writes the grid."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_wan_i2v_cache import data, folders  # noqa: F401 (fixtures)
from wan_fixtures import ROOT

from mmalign.cli import main
from mmalign.data.video import load_video
from mmalign.config import Config, from_dict
from mmalign.modalities import build_modality
from mmalign.modalities.experts import TwoExperts

LUMA = np.array([0.299, 0.587, 0.114])


def parts_of(model):
    """{"transformer": ...[, "transformer_2": ...]} of a trained Wan model (two experts or one)."""
    return model.components() if isinstance(model, TwoExperts) else {"transformer": model}


def sharpened(model):
    """A copy whose cross-attention reads its conditioning strongly (the random tiny model barely does)."""
    model = copy.deepcopy(model)
    blocks = [m.blocks[0] for m in parts_of(model).values()]
    with torch.no_grad():
        for block in blocks:
            for weight in (block.attn2.norm_q.weight, block.attn2.norm_k.weight, block.attn2.to_out[0].weight):
                weight.mul_(20)
    return model


def direct(folder, model, image, prompt, seeds, **kwargs):
    """WanImageToVideoPipeline.from_pretrained(folder) with `model`'s transformer(s): uint8 videos (F, H, W, 3)."""
    from diffusers import WanImageToVideoPipeline

    from mmalign.generate.video import to_uint8

    pipe = WanImageToVideoPipeline.from_pretrained(folder, **parts_of(model))
    with torch.no_grad():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        frames = pipe(image=image, prompt=[prompt] * len(seeds), generator=generators,
                      num_inference_steps=2, height=16, width=16, num_frames=5, guidance_scale=3.0,
                      output_type="np", **kwargs).frames
    return [to_uint8(v).astype(np.int16) for v in frames]


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_i2v_validation_grid_is_the_i2v_pipelines_videos(folders, data, version, tmp_path):
    from mmalign.modalities.validation import validate_images

    cfg = from_dict(Config, {"modality": "wan", "model": {"path": str(folders[version])}, "data": {"train": str(data)},
                             "diffusion": {"resolution": 16, "num_frames": 5,
                                           "validation_prompts": ["row one", "row two"]},  # rows: the first 2 records
                             "train": {"validate_every": 1}})
    model, likelihood, _ = build_modality(cfg)
    model = sharpened(model)
    out = validate_images(likelihood, model, 1, tmp_path, cfg.diffusion.validation_prompts, [0, 1], 2, 3.0)
    assert out["validation/videos"] == 4
    layout = json.loads((tmp_path / "grid.json").read_text())
    records = [json.loads(line) for line in open(data)][:2]
    assert layout["rows"] == [r["prompt"] for r in records] and layout["sources"] == ["sources/0.png", "sources/1.png"]
    sheet = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16)  # lossless: exact up to rounding
    assert sheet.shape == (4 * 16, 5 * 16, 3)
    grid = np.stack([np.asarray(f, dtype=np.float64) @ LUMA for f in load_video(str(tmp_path / "grid.mp4"), "grid")])
    assert grid.shape == (5, 32, 32)  # two record rows, two seed columns
    for row, record in enumerate(records):
        videos = direct(folders[version], model, Image.open(data.parent / record["source_image"]), record["prompt"],
                        [0, 1])
        for col, video in enumerate(videos):
            i = 2 * row + col
            for k in range(5):
                assert np.abs(sheet[16 * i : 16 * (i + 1), 16 * k : 16 * (k + 1)] - video[k]).max() <= 1, (row, col, k)
            tile = grid[:, 16 * row : 16 * (row + 1), 16 * col : 16 * (col + 1)]
            assert np.abs(tile - video @ LUMA).mean() < 4  # H.264 rounding
    other = direct(folders[version], model, Image.open(data.parent / records[1]["source_image"]), records[0]["prompt"],
                   [0])[0]
    assert np.abs(other - sheet[:16].reshape(16, 5, 16, 3).transpose(1, 0, 2, 3)).mean() > 2  # the source matters


def test_train_with_validate_every_writes_the_i2v_grid(folders, data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "wan_dpo.yaml"), f"model.path={folders['2.2']}",
                 f"data.train={data}", "train.max_steps=2", f"train.output_dir={run}", "train.progress=false",
                 "train.tensorboard=false", "train.log_every=1", "diffusion.random_flip=false",
                 "train.validate_every=2",
                 "diffusion.validation_steps=2", "diffusion.validation_prompts=[x]",
                 "diffusion.validation_seeds=[0]"]) == 0
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["validation/videos"] for r in logged if "validation/videos" in r] == [1.0]
    grid = run / "validation" / "step_00000002"
    assert {p.name for p in grid.iterdir()} == {"grid.mp4", "grid.png", "grid.json"}
    assert len(load_video(str(grid / "grid.mp4"), "grid")) == 5
    assert json.loads((grid / "grid.json").read_text())["sources"] == ["sources/0.png"]
    assert all(math.isfinite(r["loss"]) for r in logged if "loss" in r)
