"""Flow-DPO likelihoods (`sd3`, `flux`) on tiny pipelines saved to disk and loaded back through
`build(cfg)`: the σ shift, x_t and the velocity target, the shared draw, the β convention,
the prompt layout against diffusers' own encode_prompt, FLUX packing, the CLI with LoRA."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import ZeroDenoiser, build_for, draw_for, indexed_pairs
from flow_fixtures import FLUX_SCHEDULER, T5_TOKENS, T5_WIDTH, save_tiny_flow_pipeline

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.errors import CacheError
from mmalign.losses import dpo_loss
from mmalign.modalities import build_modality
from mmalign.modalities.flow import flow_shift, latent_image_ids, pack_latents, shift_sigmas
from mmalign.types import LogpOutput

CLIP_TOKENS = 16  # diffusion_fixtures.MAX_TOKENS


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_pipelines")
    sd3 = save_tiny_flow_pipeline(root / "sd3")
    no_t5 = root / "sd3_no_t5"  # the same weights without text_encoder_3/ (SD3 without T5)
    shutil.copytree(sd3, no_t5, ignore=shutil.ignore_patterns("*_3"))
    return {"sd3": sd3, "sd3_no_t5": no_t5, "flux": save_tiny_flow_pipeline(root / "flux", flux=True, seed=1)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return indexed_pairs(tmp_path_factory.mktemp("pairs"))


def build(pipelines, pairs, name="sd3", modality="sd3", **diffusion):
    return build_for(pipelines[name], pairs["path"], modality, **diffusion)


# -- the σ shift ----------------------------------------------------------------------------
def test_shift_formula_and_flux_dynamic_shift_by_hand():
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / 2
    assert shift_sigmas(torch.tensor(0.25), 3.0).item() == pytest.approx(0.5)  # 0.75 / 1.5
    assert flow_shift({"shift": 3.0}, 16) == 3.0  # SD3: static, independent of the size
    # FLUX, 16 packed tokens: m = 0.65 / 3840, mu = 0.5 - 240 m = 0.459375, s = e^mu
    assert flow_shift(FLUX_SCHEDULER, 16) == pytest.approx(1.5830842, rel=1e-6)
    assert flow_shift(FLUX_SCHEDULER, 4096) == pytest.approx(math.exp(1.15))  # 1024² FLUX: mu = max_shift
    assert flow_shift(dict(FLUX_SCHEDULER, time_shift_type="linear"), 256) == pytest.approx(0.5)


def test_dynamic_shift_agrees_with_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    u = torch.tensor([0.1, 0.5, 0.9])
    for seq_len in (16, 1024, 4096):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        torch.testing.assert_close(shift_sigmas(u, flow_shift(scheduler.config, seq_len)),
                                   scheduler.time_shift(mu, 1.0, u))


def test_drawn_sigmas_are_logit_normal_through_the_shift(pipelines, pairs):
    _, likelihood, _ = build(pipelines, pairs)
    generator = torch.Generator().manual_seed(0)
    sigmas = torch.cat([likelihood.objective.draw_time(generator) for _ in range(4001)])
    assert ((sigmas > 0) & (sigmas < 1)).all()
    assert sigmas.median().item() == pytest.approx(0.75, abs=0.02)  # shift(median u = 0.5) = 0.75
    # P(σ < 0.5) = P(u < 0.25) = Φ(logit 0.25) = Φ(-1.0986) = 0.136
    assert (sigmas < 0.5).float().mean().item() == pytest.approx(0.136, abs=0.02)


# -- loading and the prompt layout ------------------------------------------------------------
def test_build_loads_the_saved_sd3_pipeline(pipelines, pairs):
    transformer, likelihood, processor = build(pipelines, pairs)
    assert type(transformer).__name__ == "SD3Transformer2DModel" and processor is None
    assert likelihood.deterministic is False and len(likelihood.text_encoders) == 3
    frozen = [likelihood.vae, *likelihood.text_encoders]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert likelihood.vae.config.shift_factor == pytest.approx(0.0609)
    with pytest.raises(ValueError, match="velocity"):
        build(pipelines, pairs, prediction_type="epsilon")


def test_sd3_prompt_embeddings_match_the_diffusers_pipeline(pipelines, pairs):
    from diffusers import StableDiffusion3Pipeline

    transformer, likelihood, _ = build(pipelines, pairs)
    batch, draw = draw_for(likelihood, pairs["records"][:2])
    hidden, pooled = draw.values["encoder_hidden_states"], draw.values["pooled_projections"]
    assert hidden.shape == (4, CLIP_TOKENS + T5_TOKENS, T5_WIDTH) and pooled.shape == (4, 16 + 24)
    assert torch.equal(hidden[:, :CLIP_TOKENS, 32 + 48:], torch.zeros(4, CLIP_TOKENS, T5_WIDTH - 80))  # zero pad
    enc = likelihood.text_encoders
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=likelihood.scheduler, vae=likelihood.vae,
                                    text_encoder=enc[0], tokenizer=likelihood.tokenizers[0], text_encoder_2=enc[1],
                                    tokenizer_2=likelihood.tokenizers[1], text_encoder_3=enc[2],
                                    tokenizer_3=likelihood.tokenizers[2])
    prompts = [r["prompt"] for r in pairs["records"][:2]]
    expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                         do_classifier_free_guidance=False,
                                                         max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(hidden[:2], expected)
    torch.testing.assert_close(pooled[:2], expected_pooled)


def test_sd3_without_t5_uses_zeros_like_the_pipeline(pipelines, pairs):
    _, likelihood, _ = build(pipelines, pairs, "sd3_no_t5")
    assert len(likelihood.text_encoders) == 2
    cond = likelihood.encode_text(["a red circle"])["encoder_hidden_states"]
    assert cond.shape == (1, CLIP_TOKENS + 256, T5_WIDTH)  # the pipeline's 256 zero T5 tokens
    assert torch.equal(cond[:, CLIP_TOKENS:], torch.zeros(1, 256, T5_WIDTH))
    _, full, _ = build(pipelines, pairs)
    with_t5 = full.encode_text(["a red circle"])["encoder_hidden_states"]
    torch.testing.assert_close(cond[:, :CLIP_TOKENS], with_t5[:, :CLIP_TOKENS])


# -- x_t, the velocity target and the shared draw -------------------------------------------------
def test_noisy_input_and_velocity_target_equal_the_closed_form(pipelines, pairs):
    _, likelihood, _ = build(pipelines, pairs)
    batch, draw = draw_for(likelihood, pairs["records"])
    model = ZeroDenoiser("hidden_states")
    out = likelihood.logps(model, batch, draw)
    x0, eps, sigma = (draw.values[k].double() for k in ("latents", "noise", "sigmas"))
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(model.seen["hidden_states"].double(), (1 - s) * x0 + s * eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.seen["timestep"].double(), sigma * 1000)  # σ·1000, float32
    assert model.seen["timestep"].dtype == torch.float32
    torch.testing.assert_close(out.diagnostics["mse"].double(), (eps - x0).pow(2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(out.logps, -0.5 * out.diagnostics["mse"], rtol=0, atol=0)
    assert model.seen["pooled_projections"].shape == (8, 40)


def test_draw_is_shared_within_a_pair_and_reproducible(pipelines, pairs):
    _, likelihood, _ = build(pipelines, pairs)
    batch, draw = draw_for(likelihood, pairs["records"])
    v, b = draw.values, 4
    assert torch.equal(v["sigmas"][:b], v["sigmas"][b:]) and len(set(v["sigmas"][:b].tolist())) == b
    assert torch.equal(v["noise"][:b], v["noise"][b:]) and not torch.equal(v["noise"][0], v["noise"][1])
    assert torch.equal(v["encoder_hidden_states"][:b], v["encoder_hidden_states"][b:])
    assert not torch.allclose(v["latents"][:b], v["latents"][b:])  # different images
    again = likelihood.draw(batch, torch.Generator().manual_seed(0)).values
    assert all(torch.equal(v[k], again[k]) for k in v)
    assert not torch.equal(v["sigmas"], likelihood.draw(batch, torch.Generator().manual_seed(1)).values["sigmas"])


# -- the β convention ------------------------------------------------------------------------
def test_flow_dpo_literal_value_at_beta_100():
    """mse: policy (0.50, 0.52), reference (0.51, 0.51): inside = -50·(-0.02 - 0) = 1,
    loss = -log σ(1) = 0.3132617 (Flow-DPO's -log σ(-β/2·[Δmse_θ - Δmse_ref]))."""
    policy = LogpOutput(-0.5 * torch.tensor([0.50, 0.52], dtype=torch.float64))
    reference = LogpOutput(-0.5 * torch.tensor([0.51, 0.51], dtype=torch.float64))
    loss = dpo_loss(policy.pairs(), reference.pairs(), beta=100.0)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)


def test_dpo_loss_is_the_flow_dpo_formula(pipelines, pairs):
    transformer, likelihood, _ = build(pipelines, pairs)
    batch, draw = draw_for(likelihood, pairs["records"])
    reference = likelihood.logps(transformer, batch, draw)
    same = likelihood.logps(copy.deepcopy(transformer), batch, draw)
    same_loss = dpo_loss(same.pairs(), reference.pairs(), beta=100.0)
    torch.testing.assert_close(same_loss, torch.full((4,), math.log(2)), rtol=0, atol=0)

    policy = copy.deepcopy(transformer)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    ours = likelihood.logps(policy, batch, draw)
    loss = dpo_loss(ours.pairs(), reference.pairs(), beta=100.0).detach().double()
    mse_p, mse_r = ours.diagnostics["mse"].detach().double(), reference.diagnostics["mse"].double()
    inside = -100.0 / 2 * ((mse_p[:4] - mse_p[4:]) - (mse_r[:4] - mse_r[4:]))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(inside), rtol=1e-4, atol=1e-6)
    assert (loss - math.log(2)).abs().max() > 1e-3  # the perturbation moved the loss


# -- FLUX ------------------------------------------------------------------------------------------
def test_flux_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 4, 8, 6), rtol=0, atol=0)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(8, 6), ids) and latent_image_ids(8, 6)[4].tolist() == [0, 1, 1]


def test_flux_conditioning_packing_and_target(pipelines, pairs):
    from diffusers import FluxPipeline

    transformer, likelihood, _ = build(pipelines, pairs, "flux", "flux")
    _, h, w = likelihood.latents.latent_shape()
    assert (h // 2) * (w // 2) == 16  # the packed sequence length FLUX shifts with
    assert likelihood.objective.shift == pytest.approx(1.5830842, rel=1e-6)
    assert flow_shift(likelihood.scheduler.config, 16) == pytest.approx(1.5830842, rel=1e-6)
    batch, draw = draw_for(likelihood, pairs["records"][:2])
    enc, tok = likelihood.text_encoders, likelihood.tokenizers
    pipe = FluxPipeline(scheduler=likelihood.scheduler, vae=likelihood.vae, text_encoder=enc[0], tokenizer=tok[0],
                        text_encoder_2=enc[1], tokenizer_2=tok[1], transformer=transformer)
    prompts = [r["prompt"] for r in pairs["records"][:2]]
    hidden, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(draw.values["encoder_hidden_states"][:2], hidden)
    torch.testing.assert_close(draw.values["pooled_projections"][:2], pooled)

    assert likelihood.denoiser.guidance_embeds  # read from the transformer config
    model = ZeroDenoiser("hidden_states")
    out = likelihood.logps(model, batch, draw)
    x0, eps, sigma = (draw.values[k] for k in ("latents", "noise", "sigmas"))
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(model.seen["hidden_states"], pack_latents((1 - s) * x0 + s * eps))
    assert model.seen["hidden_states"].shape == (4, 16, 16)
    torch.testing.assert_close(model.seen["timestep"], sigma)  # FLUX multiplies by 1000 itself
    assert model.seen["guidance"].tolist() == [3.5] * 4
    likelihood.denoiser.guidance_embeds = False  # FLUX.1-schnell: no guidance input
    likelihood.logps(model, batch, draw)
    assert model.seen["guidance"] is None
    likelihood.denoiser.guidance_embeds = True
    assert model.seen["img_ids"].shape == (16, 3) and torch.equal(model.seen["txt_ids"], torch.zeros(T5_TOKENS, 3))
    torch.testing.assert_close(out.diagnostics["mse"], (eps - x0).pow(2).mean(dim=(1, 2, 3)))
    real = likelihood.logps(transformer, batch, draw)
    assert real.logps.shape == (4,) and torch.isfinite(real.logps).all()


# -- the CLI and the shipped configs ---------------------------------------------------------------
def _run_tiny_config(tmp_path, pipelines, pairs, name, config, *extra):
    overrides = [f"model.path={pipelines[name]}", f"data.train={pairs['path']}", "train.max_steps=2",
                 "train.batch_size=2", f"train.output_dir={tmp_path / 'run'}", "train.progress=false",
                 "train.tensorboard=false", "train.log_every=1", *extra]
    assert main(["train", str(Path(__file__).parents[1] / "configs" / config), *overrides]) == 0
    return [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]


def test_cli_trains_sd3_flow_dpo_with_lora(pipelines, pairs, tmp_path):
    """configs/tiny/flow_dpo.yaml: LoRA on to_q/to_k/to_v/to_out.0, reference = adapters off."""
    rows = _run_tiny_config(tmp_path, pipelines, pairs, "sd3", "tiny/flow_dpo.yaml")
    assert [r["step"] for r in rows] == [1, 2]
    # The LoRA B matrices start at zero: policy == base reference on the first draw.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["mse/policy"] == pytest.approx(rows[0]["mse/ref"], abs=1e-6)
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "mse/policy", "mse/ref", "rewards/margins"))
        assert r["mse/policy"] > 0
    assert rows[-1]["mse/policy"] != rows[-1]["mse/ref"]  # the adapters moved the policy
    adapter = tmp_path / "run" / "final" / "adapter_config.json"
    assert adapter.is_file()
    assert set(json.loads(adapter.read_text())["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0"}


def test_lora_disabled_reference_is_exactly_the_base_transformer(pipelines, pairs, tmp_path):
    from mmalign.config import load_config
    from mmalign.train.trainer import PreferenceTrainer

    config = Path(__file__).parents[1] / "configs" / "tiny" / "flow_dpo.yaml"
    cfg = load_config(config, [f"model.path={pipelines['sd3']}", f"data.train={pairs['path']}", "train.batch_size=2",
                               f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false"])
    transformer, likelihood, _ = build_modality(cfg)
    base = copy.deepcopy(transformer)
    trainer = PreferenceTrainer(cfg, transformer, likelihood)
    assert trainer.strategy == "lora_disabled"
    trainer.train_step()
    trainer.train_step()
    batch, draw = draw_for(likelihood, pairs["records"])
    expected = likelihood.logps(base.eval(), batch, draw).logps
    torch.testing.assert_close(trainer.reference.logps(batch, draw).logps, expected, rtol=0, atol=0)
    assert not torch.allclose(likelihood.logps(trainer.unwrapped, batch, draw).logps, expected)  # adapters learnt


def test_cli_trains_flux_flow_dpo(pipelines, pairs, tmp_path):
    rows = _run_tiny_config(tmp_path, pipelines, pairs, "flux", "flux/flow_dpo_lora.yaml", "diffusion.resolution=16",
                            "model.dtype=float32", 'train.mixed_precision="no"', "model.gradient_checkpointing=false",
                            "train.grad_accum=1", "optim.warmup_steps=0", "data.format=auto")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["mse/policy"]) for r in rows)


def test_a_unet_folder_is_not_a_flow_pipeline(tmp_path, pairs):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match="no transformer/ inside"):
        build({"x": tmp_path}, pairs, "x")
    with pytest.raises(ConfigError, match="no transformer/ inside"):  # checked before a cache is looked for
        build({"x": tmp_path}, pairs, "x", cache_dir=str(tmp_path))


def test_a_cache_dir_without_a_cache_is_not_silently_ignored(pipelines, pairs, tmp_path):
    with pytest.raises(CacheError, match="unset diffusion.cache_dir"):
        build(pipelines, pairs, "sd3", cache_dir=str(tmp_path / "empty"))
