"""Diffusion-DPO ELBO likelihoods (`sd`, `sdxl`) on tiny pipelines saved to disk and loaded
back through `build(cfg)`: targets, the shared draw, the paper's β convention, SDXL
conditioning, augmentation, caption dropout, LoRA reference, the CLI and bad data."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from diffusion_fixtures import ZeroDenoiser, build_for, draw_for, indexed_pairs, save_tiny_pipeline, write_image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from mmalign.cli import main
from mmalign.config import Config, ConfigError, from_dict, load_config
from mmalign.data.preference import DataError
from mmalign.losses import dpo_loss
from mmalign.modalities import build_modality


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    sd = save_tiny_pipeline(root / "sd")
    vpred = root / "sd_v"  # the same weights, an SD2-style v-prediction scheduler
    shutil.copytree(sd, vpred)
    sched = vpred / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(dict(json.loads(sched.read_text()), prediction_type="v_prediction")))
    return {"sd": sd, "sd_v": vpred, "sdxl": save_tiny_pipeline(root / "sdxl", sdxl=True, seed=1)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return indexed_pairs(tmp_path_factory.mktemp("pairs"))


def build(pipelines, pairs, name="sd", modality="sd", **diffusion):
    return build_for(pipelines[name], pairs["path"], modality, **diffusion)


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of the scaled_linear schedule (β from 0.00085 to 0.012 over 1000 steps), by hand."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# -- loading ------------------------------------------------------------------------------
def test_build_loads_the_saved_pipeline_with_a_frozen_fp32_vae(pipelines, pairs):
    cfg = from_dict(Config, {"modality": "sdxl", "model": {"path": str(pipelines["sdxl"]), "dtype": "bfloat16"},
                             "data": {"train": str(pairs["path"])}, "diffusion": {"resolution": 16}})
    unet, likelihood, processor = build_modality(cfg)
    assert processor is None and likelihood.deterministic is False
    assert unet.dtype == torch.bfloat16 and all(p.requires_grad for p in unet.parameters())
    assert likelihood.vae.dtype == torch.float32  # diffusion.vae_dtype default
    frozen = [likelihood.vae, *likelihood.text_encoders]
    assert len(likelihood.text_encoders) == 2 and not any(p.requires_grad for m in frozen for p in m.parameters())
    assert type(likelihood.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"
    batch, draw = draw_for(likelihood, pairs["records"][:2])
    assert draw.values["latents"].dtype == torch.float32 and torch.isfinite(draw.values["latents"]).all()
    out = likelihood.logps(unet, batch, draw)
    assert out.logps.shape == (4,) and torch.isfinite(out.logps).all()


# -- the ELBO target ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "sd_v"])
def test_noisy_input_and_target_equal_the_closed_form(pipelines, pairs, name):
    _, likelihood, _ = build(pipelines, pairs, name)
    assert likelihood.prediction_type == ("epsilon" if name == "sd" else "v_prediction")  # read from the scheduler
    batch, draw = draw_for(likelihood, pairs["records"])
    model = ZeroDenoiser()
    out = likelihood.logps(model, batch, draw)
    x0, eps, t = (draw.values[k].double() for k in ("latents", "noise", "timesteps"))
    a = scaled_linear_alphas_cumprod()[t.long()].view(-1, 1, 1, 1)
    expected_xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(model.seen["sample"].double(), expected_xt, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.seen["timestep"], draw.values["timesteps"])
    target = eps if name == "sd" else a.sqrt() * eps - (1 - a).sqrt() * x0
    expected_mse = target.pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.diagnostics["mse"].double(), expected_mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logps, -0.5 * out.diagnostics["mse"], rtol=0, atol=0)
    if name == "sd_v":  # the v target really differs from ε at these timesteps
        assert not torch.allclose(expected_mse, eps.pow(2).mean(dim=(1, 2, 3)), atol=1e-3)


# -- the shared draw and the β convention --------------------------------------------------
def test_draw_is_shared_within_a_pair_and_reproducible(pipelines, pairs):
    _, likelihood, _ = build(pipelines, pairs)
    batch, draw = draw_for(likelihood, pairs["records"])
    v, b = draw.values, 4
    assert torch.equal(v["timesteps"][:b], v["timesteps"][b:]) and len(set(v["timesteps"][:b].tolist())) > 1
    assert torch.equal(v["noise"][:b], v["noise"][b:]) and not torch.equal(v["noise"][0], v["noise"][1])
    assert torch.equal(v["encoder_hidden_states"][:b], v["encoder_hidden_states"][b:])
    assert not torch.allclose(v["latents"][:b], v["latents"][b:])  # different images
    again = likelihood.draw(batch, torch.Generator().manual_seed(0)).values
    other = likelihood.draw(batch, torch.Generator().manual_seed(1)).values
    assert all(torch.equal(v[k], again[k]) for k in v)
    assert not torch.equal(v["noise"], other["noise"])


def test_dpo_loss_is_the_official_diffusion_dpo_formula_at_beta_5000(pipelines, pairs):
    unet, likelihood, _ = build(pipelines, pairs)
    batch, draw = draw_for(likelihood, pairs["records"])
    reference = likelihood.logps(unet, batch, draw)
    same = likelihood.logps(copy.deepcopy(unet), batch, draw)
    same_loss = dpo_loss(same.pairs(), reference.pairs(), beta=5000.0)
    torch.testing.assert_close(same_loss, torch.full((4,), math.log(2)), rtol=0, atol=0)

    policy = copy.deepcopy(unet)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator))
    ours = likelihood.logps(policy, batch, draw)
    loss = dpo_loss(ours.pairs(), reference.pairs(), beta=5000.0).detach().double()
    mse_p, mse_r = ours.diagnostics["mse"].detach().double(), reference.diagnostics["mse"].double()
    inside = -0.5 * 5000 * ((mse_p[:4] - mse_p[4:]) - (mse_r[:4] - mse_r[4:]))
    official = -torch.nn.functional.logsigmoid(inside)
    torch.testing.assert_close(loss, official, rtol=1e-4, atol=1e-6)
    assert (loss - math.log(2)).abs().max() > 1e-3  # the perturbation moved the loss


# -- SDXL conditioning ----------------------------------------------------------------------
def test_sdxl_prompt_embeddings_and_pooled_from_the_second_encoder(pipelines, pairs):
    _, likelihood, _ = build(pipelines, pairs, "sdxl", "sdxl")
    batch, draw = draw_for(likelihood, pairs["records"][:2])
    hidden, pooled = draw.values["encoder_hidden_states"], draw.values["text_embeds"]
    assert hidden.shape == (4, 16, 32 + 48) and pooled.shape == (4, 24)
    path = pipelines["sdxl"]
    enc1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    enc2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2").eval()
    with torch.no_grad():
        out1 = enc1(batch.inputs["input_ids"][:2], output_hidden_states=True)
        out2 = enc2(batch.inputs["input_ids_2"][:2], output_hidden_states=True)
    torch.testing.assert_close(hidden[:2, :, :32], out1.hidden_states[-2])
    torch.testing.assert_close(hidden[:2, :, 32:], out2.hidden_states[-2])
    assert not torch.allclose(out1.hidden_states[-2], out1.last_hidden_state)  # penultimate, not last
    torch.testing.assert_close(pooled[:2], out2.text_embeds)


def test_sdxl_time_ids_from_the_real_size_and_crop(pipelines, pairs, tmp_path):
    """wide 40×20 (w×h) -> resized 32×16, centre crop left 8; tall 16×30 -> 16×30, top 7."""
    _, likelihood, _ = build(pipelines, pairs, "sdxl", "sdxl")
    wide, tall = write_image(tmp_path / "wide.png", 40, 20, 0), write_image(tmp_path / "tall.png", 16, 30, 1)
    batch, draw = draw_for(likelihood, [{"prompt": "a red circle", "chosen": str(wide), "rejected": str(tall)}])
    assert draw.values["time_ids"].tolist() == [[20, 40, 0, 8, 16, 16], [30, 16, 7, 0, 16, 16]]
    assert batch.inputs["pixel_values"].shape == (2, 3, 30, 32)  # padded to the batch's largest resize
    # A random crop at the far right of the wide image, flipped: in the flipped image it is at left 0.
    pixels, top_left = likelihood.latents.augment(batch.inputs, torch.tensor([True, False]), torch.tensor([[0.5, 0.99], [0.0, 0.0]]))
    assert top_left.tolist() == [[0, 8], [7, 0]]  # crop "center": fractions are ignored
    likelihood.settings.crop = "random"
    pixels, top_left = likelihood.latents.augment(batch.inputs, torch.tensor([True, False]), torch.tensor([[0.5, 0.99], [0.0, 0.0]]))
    assert top_left.tolist() == [[0, 0], [0, 0]]
    torch.testing.assert_close(pixels[0], batch.inputs["pixel_values"][0, :, :16, 16:32].flip(-1))


# -- augmentation and caption dropout --------------------------------------------------------
def _captured_pixels(likelihood, batch, seed):
    seen = []
    original = likelihood.latents.latent_dist
    likelihood.latents.latent_dist = lambda pixels, batch_size=0: seen.append(pixels) or original(pixels, batch_size)
    try:
        likelihood.draw(batch, torch.Generator().manual_seed(seed))
    finally:
        del likelihood.latents.latent_dist
    return seen[0]


@pytest.mark.parametrize("crop", ["center", "random"])
def test_both_images_of_a_pair_get_the_same_crop_and_flip(pipelines, pairs, tmp_path, crop):
    _, likelihood, _ = build(pipelines, pairs, random_flip=True, crop=crop)
    image = str(write_image(tmp_path / "wide.png", 30, 16, 5))
    batch = likelihood.collate([{"prompt": "a red circle", "chosen": image, "rejected": image}] * 2, "pair")
    seen = [_captured_pixels(likelihood, batch, seed) for seed in range(8)]
    for pixels in seen:
        torch.testing.assert_close(pixels[:2], pixels[2:], rtol=0, atol=0)
    centre = batch.inputs["pixel_values"][0, :, :, 7:23]
    if crop == "center":  # every draw is the centre crop or its mirror image, and both occur
        flipped = [torch.equal(p[0], centre.flip(-1)) for p in seen]
        assert all(f or torch.equal(p[0], centre) for f, p in zip(flipped, seen)) and 0 < sum(flipped) < 8
    else:
        assert len({p[0].sum().item() for p in seen}) > 2  # crops move


@pytest.mark.parametrize("null_prompt", ["empty", "zeros"])
def test_caption_dropout_gives_the_null_prompt(pipelines, pairs, null_prompt):
    _, likelihood, _ = build(pipelines, pairs, "sdxl", "sdxl", caption_dropout=1.0, null_prompt=null_prompt)
    _, draw = draw_for(likelihood, pairs["records"])
    assert draw.values["caption_dropped"].all()
    empty = likelihood.encode_text([""])
    for key in ("encoder_hidden_states", "text_embeds"):
        expected = empty[key] if null_prompt == "empty" else torch.zeros_like(empty[key])
        torch.testing.assert_close(draw.values[key], expected.expand_as(draw.values[key]), rtol=1e-6, atol=1e-6)
    likelihood.settings.caption_dropout = 0.0
    _, kept = draw_for(likelihood, pairs["records"])
    prompts = [r["prompt"] for r in pairs["records"]]
    torch.testing.assert_close(kept.values["encoder_hidden_states"][:4], likelihood.encode_text(prompts)["encoder_hidden_states"])
    assert not torch.allclose(kept.values["encoder_hidden_states"][0], empty["encoder_hidden_states"][0])


# -- trainer integration --------------------------------------------------------------------
def write_config(tmp_path, pipeline, data, **sections):
    cfg = {"modality": "sdxl", "model": {"path": str(pipeline)}, "data": {"train": str(data)},
           "diffusion": {"resolution": 16, "random_flip": True, "crop": "random"},
           "loss": {"name": "dpo", "beta": 5000.0}, "optim": {"name": "adafactor", "lr": 1e-4},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 2, "log_every": 1,
                     "progress": False, "tensorboard": False}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_trains_sdxl_dpo_end_to_end(pipelines, pairs, tmp_path):
    cfg = write_config(tmp_path, pipelines["sdxl"], pairs["path"], model={"gradient_checkpointing": True})
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # policy == frozen reference on the same draw: log 2, up to float rounding (the reference runs in
    # eval mode without autograd, which changes the last bit of mse; β 5000 turns 1e-7 into 5e-4).
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[0]["mse/policy"] == pytest.approx(rows[0]["mse/ref"], abs=1e-6)
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "mse/policy", "mse/ref", "rewards/margins", "grad_norm"))
    assert rows[-1]["mse/policy"] != rows[-1]["mse/ref"]  # the policy moved
    assert (tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors").is_file()


def test_lora_disabled_reference_is_exactly_the_base_unet(pipelines, pairs, tmp_path):
    from mmalign.train.trainer import PreferenceTrainer

    cfg = load_config(write_config(tmp_path, pipelines["sdxl"], pairs["path"], optim={"name": "adamw", "lr": 1e-2},
                                   lora={"enabled": True, "r": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}))
    unet, likelihood, _ = build_modality(cfg)
    base = copy.deepcopy(unet)
    trainer = PreferenceTrainer(cfg, unet, likelihood)
    assert trainer.strategy == "lora_disabled"
    for _ in range(2):
        trainer.train_step()
    lora = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    batch, draw = draw_for(likelihood, pairs["records"])
    reference = trainer.reference.logps(batch, draw)
    expected = likelihood.logps(base.eval(), batch, draw)
    torch.testing.assert_close(reference.logps, expected.logps, rtol=0, atol=0)
    policy = likelihood.logps(trainer.unwrapped, batch, draw)
    assert not torch.allclose(policy.logps, expected.logps)  # the adapters did learn something


# -- bad data and config ------------------------------------------------------------------
def test_unreadable_image_is_a_data_error_naming_the_row(pipelines, pairs, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    root = pairs["path"].parent  # absolute paths: the broken file lives elsewhere
    records = [{k: str(root / v) if k != "prompt" else v for k, v in r.items() if k != "_index"}
               for r in pairs["records"]]
    records[1]["rejected"] = str(tmp_path / "broken.png")
    _, likelihood, _ = build(pipelines, pairs)
    with pytest.raises(DataError, match="row 1, rejected: unreadable image"):
        likelihood.collate([dict(r, _index=i) for i, r in enumerate(records)], "pair")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = str(write_config(tmp_path, pipelines["sdxl"], data, train={"batch_size": 4}))
    assert main(["train", config]) == 2  # absolute paths out of the data folder (issue 23)
    assert "row 0, chosen: media path" in capsys.readouterr().err
    # allowed and not verified at load: the batch that reads the image stops with its row
    assert main(["train", config, "data.allow_outside_paths=true", "data.verify_media=none"]) == 2
    assert "row 1, rejected: unreadable image" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("diffusion.caption_dropout=1.5", "caption_dropout must be in [0, 1]"),
    ("diffusion.resolution=20", "multiple of 8"),
    ("diffusion.crop=middle", "not one of center, random"),
    ("diffusion.vae_dtype=float8", "not one of"),
])
def test_bad_diffusion_config_names_the_key(tmp_path, pipelines, pairs, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write_config(tmp_path, pipelines["sdxl"], pairs["path"]), [override])


def test_shipped_tiny_sd_config_runs_on_the_tiny_pipeline(tmp_path):
    """configs/tiny/sd_dpo.yaml with the pipeline and pairs its comment tells you to write."""
    from pathlib import Path

    from diffusion_fixtures import write_tiny_run

    data = write_tiny_run(tmp_path / "tiny_sd", count=8)
    config = Path(__file__).parents[1] / "configs" / "tiny" / "sd_dpo.yaml"
    overrides = [f"model.path={tmp_path / 'tiny_sd' / 'pipeline'}", f"data.train={data}", "train.max_steps=2",
                 f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false",
                 "train.log_every=1"]
    assert main(["train", str(config), *overrides]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["mse/policy"] > 0 for r in rows)
