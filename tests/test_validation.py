"""Validation images during diffusion training (`train.validate_every`): a PNG grid of fixed
prompts × seeds per step, reproducible, logged; on tiny SD1.5/SDXL (and SD3/FLUX flow)
pipelines built in code."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import peft
import pytest
import torch
import yaml
from diffusion_fixtures import save_tiny_pipeline, write_image_pairs
from flow_fixtures import save_tiny_flow_pipeline
from PIL import Image

from mmalign.cli import main
from mmalign.config import Config, from_dict
from mmalign.modalities import build_modality
from mmalign.modalities.diffusion import DiffusionLikelihood
from mmalign.modalities.validation import validate_images

PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1, 7]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": save_tiny_pipeline(root / "sd"), "sdxl": save_tiny_pipeline(root / "sdxl", sdxl=True, seed=1)}


def build(path, modality):
    cfg = from_dict(Config, {"modality": modality, "model": {"path": str(path)}, "diffusion": {"resolution": 16}})
    return build_modality(cfg)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_training_writes_a_grid_per_step_and_logs_the_metrics(pipelines, tmp_path):
    records = write_image_pairs(tmp_path / "pairs", 4)
    data = tmp_path / "pairs" / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"modality": "sd", "model": {"path": str(pipelines["sd"])}, "data": {"train": str(data)},
           "diffusion": {"resolution": 16, "validation_prompts": PROMPTS, "validation_seeds": SEEDS,
                         "validation_steps": 2, "validation_guidance": 3.0},
           "lora": {"enabled": True, "r": 4, "target_modules": ["to_q", "to_v"], "dropout": 0.5},
           "loss": {"beta": 5000.0}, "optim": {"lr": 1e-2},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "log_every": 1,
                     "validate_every": 1, "progress": False, "tensorboard": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "config.yaml")]) == 0
    run = tmp_path / "run"
    for step in (1, 2):
        folder = run / "validation" / f"step_{step:08d}"
        assert pixels(folder / "grid.png").shape == (16 * len(PROMPTS), 16 * len(SEEDS), 3)
        layout = json.loads((folder / "grid.json").read_text())
        assert layout["rows"] == PROMPTS and layout["columns"] == SEEDS and layout["step"] == step
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    logged = [r for r in rows if "validation/images" in r]
    assert [r["step"] for r in logged] == [1, 2] and all(r["validation/images"] == 6 for r in logged)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # the training lines are kept
    # the LoRA moved between the steps, so the images did too
    assert not np.array_equal(pixels(run / "validation/step_00000001/grid.png"),
                              pixels(run / "validation/step_00000002/grid.png"))


@pytest.mark.parametrize("modality", ["sd", "sdxl"])
def test_same_seeds_give_the_same_images_in_every_call(pipelines, tmp_path, modality):
    unet, likelihood, _ = build(pipelines[modality], modality)
    unet = peft.get_peft_model(unet, peft.LoraConfig(r=4, target_modules=["to_q"], lora_dropout=0.5)).train()
    args = (PROMPTS, SEEDS, 2, 5.0)
    first = validate_images(likelihood, unet, 3, tmp_path / "a", *args)
    second = validate_images(likelihood, unet, 3, tmp_path / "b", *args)
    assert first["validation/images"] == second["validation/images"] == 6
    grid = pixels(tmp_path / "a" / "grid.png")
    np.testing.assert_array_equal(grid, pixels(tmp_path / "b" / "grid.png"))  # LoRA dropout is off
    assert unet.training  # the trainer's mode is restored
    # rows are prompts, columns seeds; each image depends on its own seed only
    validate_images(likelihood, unet, 3, tmp_path / "one", [PROMPTS[1]], [SEEDS[2]], 2, 5.0)
    np.testing.assert_array_equal(grid[16:32, 32:48], pixels(tmp_path / "one" / "grid.png"))
    assert not np.array_equal(grid[16:32, 0:16], grid[16:32, 32:48])


def test_images_use_the_policy_unet_with_its_adapters(pipelines, tmp_path):
    unet, likelihood, _ = build(pipelines["sd"], "sd")
    validate_images(likelihood, unet, 0, tmp_path / "base", PROMPTS, SEEDS, 2, 5.0)
    wrapped = peft.get_peft_model(unet, peft.LoraConfig(r=4, target_modules=["to_q", "to_k"]))
    validate_images(likelihood, wrapped, 0, tmp_path / "zero", PROMPTS, SEEDS, 2, 5.0)  # B = 0: no change yet
    np.testing.assert_array_equal(pixels(tmp_path / "base/grid.png"), pixels(tmp_path / "zero/grid.png"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    validate_images(likelihood, wrapped, 0, tmp_path / "moved", PROMPTS, SEEDS, 2, 5.0)
    assert not np.array_equal(pixels(tmp_path / "base/grid.png"), pixels(tmp_path / "moved/grid.png"))


def test_likelihood_validate_uses_the_config_and_other_likelihoods_are_skipped(pipelines, tmp_path):
    unet, likelihood, _ = build(pipelines["sd"], "sd")
    likelihood.settings.validation_prompts, likelihood.settings.validation_steps = ["a star"], 2
    assert likelihood.validate(unet, 5, tmp_path / "v")["validation/images"] == 2  # default seeds [0, 1]
    assert json.loads((tmp_path / "v" / "grid.json").read_text())["rows"] == ["a star"]

    # a family without validation images (e.g. audio): no pipeline samples it
    family = dataclasses.replace(likelihood.family, name="other", validation=False)
    other = DiffusionLikelihood(family, likelihood.objective, likelihood.latents, likelihood.conditioning,
                                likelihood.denoiser, likelihood.settings)
    with pytest.warns(UserWarning, match="not implemented for modality 'other'"):
        assert other.validate(unet, 5, tmp_path / "w") == {}
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("modality,name", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_flow_likelihoods_sample_a_grid_with_their_flow_pipeline(tmp_path, modality, name):
    transformer, likelihood, _ = build(save_tiny_flow_pipeline(tmp_path / modality, flux=modality == "flux"), modality)
    assert likelihood.family.pipeline == name
    out = validate_images(likelihood, transformer, 1, tmp_path / "a", PROMPTS, SEEDS[:2], 1, 2.0)  # one step
    assert out["validation/images"] == 4
    grid = pixels(tmp_path / "a" / "grid.png")
    assert grid.shape == (16 * len(PROMPTS), 16 * 2, 3) and grid.std() > 0
    assert json.loads((tmp_path / "a" / "grid.json").read_text())["rows"] == PROMPTS
    validate_images(likelihood, transformer, 1, tmp_path / "b", PROMPTS, SEEDS[:2], 1, 2.0)
    np.testing.assert_array_equal(grid, pixels(tmp_path / "b" / "grid.png"))  # seeded: the same pixels


@pytest.mark.parametrize("null_prompt,zeros", [("empty", False), ("zeros", True)])
def test_sdxl_samples_with_the_null_prompt_training_used(pipelines, null_prompt, zeros):
    """Training drops captions to encode("") (or zeros); the SDXL pipeline's default
    (force_zeros_for_empty_prompt) would sample the unconditional branch with zeros."""
    from mmalign.modalities.validation import sampling_pipeline

    cfg = from_dict(Config, {"modality": "sdxl", "model": {"path": str(pipelines["sdxl"])},
                             "diffusion": {"resolution": 16, "null_prompt": null_prompt}})
    unet, likelihood, _ = build_modality(cfg)
    pipe = sampling_pipeline(likelihood, unet)
    assert pipe.config.force_zeros_for_empty_prompt is zeros
    _, negative, _, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=True, negative_prompt=None)
    trained_null = likelihood.encode_text([""])["encoder_hidden_states"]
    if zeros:
        assert torch.count_nonzero(negative) == 0
    else:  # exactly the embedding training used for dropped captions
        torch.testing.assert_close(negative.float(), trained_null.float(), rtol=1e-5, atol=1e-5)
