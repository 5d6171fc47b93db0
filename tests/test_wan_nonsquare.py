"""Non-square Wan video (`diffusion.width`, height = `diffusion.resolution`): on the tiny Wan pipeline
(tests/wan_fixtures.py, spatial factor 4, patch 2) at 16 x 32 px: frames resized to cover the crop
and cropped as one clip, latents (4, 2, 4, 8), the transformer's inputs (TI2V's per-token timesteps
included) equal to WanPipeline's loop at height 16, width 32, logps equal to the hand formula
through the real transformer (its RoPE over a 2 x 4 patch grid), cached == uncached, validation
videos 16 x 32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusion_fixtures import build_for, draw_for, perturbed, uncached
from PIL import Image
from wan_fixtures import (SAMPLE, RecordingWan, copy_video_sample, fixed_sigma_scheduler, pipe_of, sample_records,
                          save_tiny_wan_pipeline)

from mmalign.families.wan import crop_size, resize_cover
from mmalign.types import Draw

DATA = SAMPLE / "train.jsonl"
HEIGHT, WIDTH = 16, 32


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipeline")


@pytest.fixture(scope="module")
def built(pipeline):
    return build_for(pipeline, DATA, "wan", num_frames=5, width=WIDTH)


def test_resize_cover_and_the_crop_of_every_frame(built):
    """A 32 x 32 clip covers 16 x 32 at scale 1 (the width binds): the centre crop is rows 8..24, all
    columns; flipped, the mirrored clip. A 40 x 20 (w x h) frame covers 64 x 16 at 64 x 32 and 40 x 30
    at 60 x 30."""
    _, likelihood, _ = built
    assert crop_size(likelihood.settings) == (HEIGHT, WIDTH)
    assert resize_cover(Image.new("RGB", (40, 20)), 16, 64).size == (64, 32)  # the width binds: 64/40 > 16/20
    assert resize_cover(Image.new("RGB", (40, 20)), 30, 40).size == (60, 30)  # the height binds: 30/20 > 40/40
    assert resize_cover(Image.new("RGB", (20, 40)), 16, 16).size == (16, 32)  # square: shortest side
    batch = likelihood.collate(sample_records()[:2], "pair")
    pixels = batch.inputs["pixel_values"]
    assert pixels.shape == (4, 3, 5, 32, 32)  # 32 x 32 clips already cover 16 x 32
    crops, corner = likelihood.latents.augment(batch.inputs, torch.tensor([False, True, False, True]),
                                               torch.zeros(4, 2))
    assert crops.shape == (4, 3, 5, HEIGHT, WIDTH) and corner.tolist() == [[8, 0]] * 4
    torch.testing.assert_close(crops[0], pixels[0, ..., 8:24, :], rtol=0, atol=0)
    torch.testing.assert_close(crops[1], pixels[1, ..., 8:24, :].flip(-1), rtol=0, atol=0)


def test_latents_and_the_transformer_call_equal_the_pipelines(built):
    """Latents (4, 2, 4, 8); for each pair g the pipeline at height 16, width 32 (schedule [1, σ_g])
    calls the transformer on x_t exactly as the likelihood does; Wan 2.2 TI2V's per-token timestep
    covers f·(h/2)·(w/2) = 2·2·4 = 16 tokens."""
    from mmalign.families.wan import WanTransformer

    _, likelihood, _ = built
    records = sample_records()[:2]
    batch, draw = draw_for(likelihood, records)
    v = draw.values
    assert likelihood.latents.latent_shape() == (4, 2, 4, 8) and v["latents"].shape == (4, 4, 2, 4, 8)
    ours = RecordingWan()
    likelihood.logps(ours, batch, draw)
    mine = ours.calls[-1]
    sigma = v["sigmas"].view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * v["latents"] + sigma * v["noise"]
    prompts = [r["prompt"] for r in records] * 2
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingWan()
        pipe_of(likelihood, theirs, fixed_sigma_scheduler(float(v["sigmas"][g])))(
            prompt=prompts, latents=noisy, height=HEIGHT, width=WIDTH, num_frames=5, guidance_scale=1.0,
            output_type="latent")
        their = theirs.calls[-1]
        torch.testing.assert_close(mine["hidden_states"][rows], their["hidden_states"][rows], rtol=0, atol=0)
        torch.testing.assert_close(mine["timestep"][rows], their["timestep"][rows], rtol=0, atol=1e-4)
    expanded, theirs = RecordingWan(), RecordingWan()
    WanTransformer(expand_timesteps=True).predict(expanded, noisy, v)
    pipe_of(likelihood, theirs, fixed_sigma_scheduler(float(v["sigmas"][0])), expand_timesteps=True)(
        prompt=prompts, latents=noisy, height=HEIGHT, width=WIDTH, num_frames=5, guidance_scale=1.0,
        output_type="latent")
    assert expanded.calls[0]["timestep"].shape == theirs.calls[-1]["timestep"].shape == (4, 16)
    torch.testing.assert_close(expanded.calls[0]["timestep"][0], theirs.calls[-1]["timestep"][0], rtol=0, atol=1e-4)


def test_logps_through_the_real_transformer_are_the_hand_formula(built):
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, sample_records())
    v = draw.values
    x0, eps, s = v["latents"], v["noise"], v["sigmas"].view(-1, 1, 1, 1, 1)
    out = likelihood.logps(transformer, batch, draw)
    with torch.no_grad():
        pred = transformer(hidden_states=(1 - s) * x0 + s * eps, timestep=v["sigmas"] * 1000,
                           encoder_hidden_states=v["encoder_hidden_states"], return_dict=False)[0]
    assert pred.shape == (8, 4, 2, 4, 8)
    mse = (pred - (eps - x0)).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.diagnostics["mse"], mse, rtol=1e-5, atol=1e-6)
    # the patch grid is 2 x 4, not 4 x 2: swapping height and width gives a different prediction
    with torch.no_grad():
        swapped = transformer(hidden_states=((1 - s) * x0 + s * eps).transpose(-1, -2), timestep=v["sigmas"] * 1000,
                              encoder_hidden_states=v["encoder_hidden_states"], return_dict=False)[0]
    assert (swapped.transpose(-1, -2) - pred).abs().max() > 1e-4


def test_cached_equals_uncached_and_the_width_is_a_cache_setting(pipeline, tmp_path):
    import mmalign.modalities.cache_writer as cw
    from mmalign.config import Config, from_dict
    from mmalign.errors import CacheError
    from mmalign.modalities import build_modality

    train = copy_video_sample(tmp_path / "data")

    def cfg(width):
        return from_dict(Config, {"modality": "wan", "model": {"path": str(pipeline)}, "data": {"train": str(train)},
                                  "diffusion": {"resolution": HEIGHT, "width": width, "num_frames": 5,
                                                "random_flip": True, "cache_dir": str(tmp_path / "c"),
                                                "cache_dtype": "float32"}, "train": {"progress": False}})

    model, plain = uncached(cfg(WIDTH))
    cw.write_cache(cfg(WIDTH), plain)
    model_c, cached, _ = build_modality(cfg(WIDTH))
    records = [dict(json.loads(line), _root=str(train.parent), _index=i)
               for i, line in enumerate(train.read_text().splitlines())]
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    policy = perturbed(model)
    for seed in range(2):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v["latents"].shape == (8, 4, 2, 4, 8)
        torch.testing.assert_close(w["latents"], v["latents"], rtol=0, atol=1e-5)
        pol, pol_c = plain.logps(policy, batch, Draw(v)), cached.logps(policy, batch_c, Draw(w))
        torch.testing.assert_close(pol_c.logps, pol.logps, rtol=0, atol=1e-6)
    with pytest.raises(CacheError, match="width"):
        build_modality(cfg(24))


def test_validation_videos_are_16_by_32(built, tmp_path):
    from mmalign.modalities.validation import validate_images

    transformer, likelihood, _ = built
    validate_images(likelihood, transformer, 1, tmp_path, ["a red circle"], [0, 1], 2, 1.0)
    sheet = np.asarray(Image.open(tmp_path / "grid.png"))
    assert sheet.shape == (2 * HEIGHT, 5 * WIDTH, 3)  # two videos, their 5 frames left to right
    assert json.loads((tmp_path / "grid.json").read_text())["width"] == WIDTH


def test_validation_samples_a_ti2v_folder_with_expand_timesteps(pipeline, tmp_path):
    """Wan 2.2 TI2V (model_index.json expand_timesteps): the in-memory validation pipeline gets the
    option too (it has no model_index.json to read), so it samples with per-token timesteps as trained."""
    import shutil

    from mmalign.modalities.validation import sampling_pipeline

    ti2v = shutil.copytree(pipeline, tmp_path / "ti2v")
    (ti2v / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    transformer, likelihood, _ = build_for(ti2v, DATA, "wan", num_frames=5, width=WIDTH)
    assert sampling_pipeline(likelihood, transformer).config.expand_timesteps is True
    plain_transformer, plain, _ = build_for(pipeline, DATA, "wan", num_frames=5)
    assert sampling_pipeline(plain, plain_transformer).config.expand_timesteps is False
