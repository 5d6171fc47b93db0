"""The FLUX.2 [klein] family (`flux2`) on a tiny pipeline saved to disk (tests/flux2_fixtures.py) and
loaded through `build(cfg)`: the prompt against Flux2KleinPipeline.encode_prompt, the latents against
its `_encode_vae_image` (patchify + batch-norm normalisation), the transformer's inputs against the
pipeline's own denoising loop at the drawn σ, the ε - x0 target, the dpo convention, cached ==
uncached, and the CLI (train, export in every format)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusion_fixtures import build_for, draw_for, indexed_pairs, perturbed, uncached
from flux2_fixtures import RecordingFlux2, save_tiny_flux2_pipeline

import mmalign.modalities.cache_writer as cw
from mmalign.cli import main
from mmalign.config import Config, ConfigError, from_dict
from mmalign.losses import dpo_loss
from mmalign.modalities import build_modality
from mmalign.modalities.flow import flow_shift
from mmalign.types import Draw

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_flux2_pipeline(tmp_path_factory.mktemp("flux2") / "pipeline")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return indexed_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def built(pipeline, pairs):
    return build_for(pipeline, pairs["path"], "flux2")


def pipe_of(likelihood, transformer, scheduler=None):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline(scheduler=scheduler or likelihood.scheduler, vae=likelihood.vae, transformer=transformer,
                              text_encoder=likelihood.text_encoders[0], tokenizer=likelihood.tokenizers[0])


def prompts_of(records):
    return [r["prompt"] for r in records] * 2  # chosen rows, then rejected rows


# -- (a) the prompt and the latents -----------------------------------------------------------------
def test_draw_conditioning_equals_the_pipeline_encode_prompt(built, pairs):
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, pairs["records"][:2])
    embeds = draw.values["prompt_embeds"]
    assert embeds.shape == (4, 512, 48)  # 512 tokens, layers 9, 18, 27 of width 16 side by side
    expected, text_ids = pipe_of(likelihood, transformer).encode_prompt(prompts_of(pairs["records"][:2]), device="cpu")
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert text_ids.shape == (4, 512, 4) and torch.equal(text_ids[0, :, 3], torch.arange(512))
    # the null prompt is the pipeline's negative prompt ""
    null, _ = pipe_of(likelihood, transformer).encode_prompt([""], device="cpu")
    torch.testing.assert_close(likelihood.encode_text([""])["prompt_embeds"], null, rtol=0, atol=0)


def test_latents_are_the_pipelines_patchified_normalised_vae_latents(built, pairs):
    transformer, likelihood, _ = built
    batch = likelihood.collate(pairs["records"][:2], "pair")
    pixels = batch.inputs["pixel_values"]
    mean, std = likelihood.latents.latent_dist(pixels)
    assert mean.shape == (4, 16, 4, 4) and likelihood.latents.latent_shape() == (16, 4, 4)
    with torch.no_grad():  # the pipeline's (and the training script's) latent_dist.mode(), patchified, normalised
        expected = pipe_of(likelihood, transformer)._encode_vae_image(pixels, None)
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
    raw_std = likelihood.vae.encode(pixels).latent_dist.std
    bn_std = torch.sqrt(likelihood.vae.bn.running_var + likelihood.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    from diffusers import Flux2KleinPipeline

    torch.testing.assert_close(std, Flux2KleinPipeline._patchify_latents(raw_std) / bn_std, rtol=1e-5, atol=1e-7)


# -- (b) the transformer call at the drawn σ --------------------------------------------------------
def test_transformer_sees_what_the_pipeline_loop_gives_it(built, pairs):
    """For each pair g: the pipeline, started at σ = 1 from latents x_t and stepped to the drawn
    σ_g (shift 1, so the schedule is [1, σ_g]; a 0 prediction leaves the latents as they are),
    calls the transformer on x_t at σ_g: exactly what the likelihood's call gives it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, likelihood, _ = built
    records = pairs["records"][:2]
    batch, draw = draw_for(likelihood, records)
    ours = RecordingFlux2()
    likelihood.logps(ours, batch, draw)
    seen = ours.calls[-1]
    v = draw.values
    sigma = v["sigmas"].view(-1, 1, 1, 1)
    noisy = (1 - sigma) * v["latents"] + sigma * v["noise"]
    unshifted = FlowMatchEulerDiscreteScheduler.from_config(likelihood.scheduler.config, shift=1.0,
                                                            use_dynamic_shifting=False)
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingFlux2()
        pipe_of(likelihood, theirs, unshifted)(
            prompt=[records[g]["prompt"]] * 2, latents=noisy[rows], sigmas=[1.0, float(v["sigmas"][g])],
            height=16, width=16, guidance_scale=1.0, output_type="latent")
        their = theirs.calls[-1]
        assert set(their) - {"joint_attention_kwargs"} == set(seen) - {"joint_attention_kwargs"}
        assert seen["hidden_states"].shape == (4, 16, 16)  # (N, h·w tokens, 16 patchified channels)
        for key in ("hidden_states", "encoder_hidden_states", "txt_ids", "img_ids", "timestep"):
            torch.testing.assert_close(seen[key][rows], their[key], rtol=0, atol=0, msg=key)
        assert seen["guidance"] is None and their["guidance"] is None  # klein: no guidance embedding
    torch.testing.assert_close(seen["timestep"], v["sigmas"], rtol=1e-7, atol=0)  # σ·1000 / 1000


# -- (c) logps and the sign of the target -----------------------------------------------------------
def test_logps_are_minus_half_mse_against_eps_minus_x0(built, pairs):
    from diffusers import Flux2KleinPipeline as P

    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    out = likelihood.logps(transformer, batch, draw)
    with torch.no_grad():  # by hand, as the training script calls it (train_dreambooth_lora_flux2_klein.py)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
        ids = P._prepare_latent_ids(noisy)
        pred = transformer(hidden_states=P._pack_latents(noisy), timestep=sigma, guidance=None,
                           encoder_hidden_states=v["prompt_embeds"], txt_ids=P._prepare_text_ids(v["prompt_embeds"]),
                           img_ids=ids, return_dict=False)[0]
        pred = P._unpack_latents_with_ids(pred, ids)
    mse = (pred - (eps - x0)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.diagnostics["mse"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logps, -0.5 * out.diagnostics["mse"], rtol=0, atol=0)

    class Oracle(RecordingFlux2):  # predicts ε - x0 exactly: error 0
        def forward(self, return_dict=True, **kwargs):
            return (P._pack_latents(eps - x0),)

    assert likelihood.logps(Oracle(), batch, draw).diagnostics["mse"].abs().max().item() < 1e-12


# -- (d) dpo at policy == reference -------------------------------------------------------------------
def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, pairs["records"])
    reference = likelihood.logps(transformer, batch, draw)
    same = likelihood.logps(copy.deepcopy(transformer), batch, draw)
    loss = dpo_loss(same.pairs(), reference.pairs(), beta=2000.0)
    torch.testing.assert_close(loss, torch.full((4,), math.log(2)), rtol=0, atol=0)


# -- the shift, the folder, the refusals -------------------------------------------------------------
def test_shift_is_the_scheduler_configs_dynamic_shift_of_the_image_tokens(built):
    _, likelihood, _ = built
    assert likelihood.objective.shift == pytest.approx(flow_shift(likelihood.scheduler.config, 16))  # 4·4 tokens


def test_folder_recognition_and_refusals(pipeline, pairs):
    from mmalign.families import family_for_folder

    assert family_for_folder(pipeline).name == "flux2"
    with pytest.raises(ConfigError, match="null_prompt: zeros"):
        build_for(pipeline, pairs["path"], "flux2", null_prompt="zeros")
    with pytest.raises(ValueError, match="velocity"):
        build_for(pipeline, pairs["path"], "flux2", prediction_type="epsilon")


# -- cached == uncached -------------------------------------------------------------------------------
def test_cached_likelihood_equals_the_uncached_one(pipeline, pairs, tmp_path):
    records = pairs["records"]
    cfg = from_dict(Config, {"modality": "flux2", "model": {"path": str(pipeline)}, "data": {"train": str(pairs["path"])},
                             "diffusion": {"resolution": 16, "caption_dropout": 0.5, "cache_dir": str(tmp_path / "c"),
                                           "cache_dtype": "float32", "cache_shard_size": 2},
                             "train": {"progress": False}})
    model, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    model_c, cached, _ = build_modality(cfg)
    assert cached.vae is None and cached.text_encoders == [] and type(cached.latents).__name__ == "CachedLatents"
    assert cached.objective.shift == plain.objective.shift
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    policy = perturbed(model)
    for seed in range(2):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v.keys() == w.keys()
        for key in ("noise", "sigmas", "timesteps", "caption_dropped", "latents"):
            assert torch.equal(v[key], w[key]), key
        torch.testing.assert_close(w["prompt_embeds"], v["prompt_embeds"], rtol=0, atol=1e-6)
        ref, ref_c = plain.logps(model, batch, Draw(v)), cached.logps(model_c, batch_c, Draw(w))
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6)
        pol, pol_c = plain.logps(policy, batch, Draw(v)), cached.logps(policy, batch_c, Draw(w))
        torch.testing.assert_close(dpo_loss(pol_c.pairs(), ref_c.pairs(), beta=2000.0),
                                   dpo_loss(pol.pairs(), ref.pairs(), beta=2000.0), rtol=0, atol=1e-3)


# -- (e) the CLI: train, then export in every declared format -------------------------------------------
def test_cli_trains_and_exports_every_format(pipeline, pairs, tmp_path, capsys):
    from diffusers import Flux2KleinPipeline

    from mmalign.export import find_run, load_trained, write_model_index
    from mmalign.families import get_family

    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "flux2_flow_dpo.yaml"), f"model.path={pipeline}",
                 f"data.train={pairs['path']}", "train.max_steps=2", "train.batch_size=2", f"train.output_dir={run}",
                 "train.progress=false", "train.tensorboard=false", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["mse/policy"] != rows[-1]["mse/ref"]

    trained, _ = load_trained(find_run(run))
    merged = copy.deepcopy(trained).merge_and_unload().eval()
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=generator), timestep=torch.tensor([0.3]),
                  encoder_hidden_states=torch.randn(1, 5, 48, generator=generator),
                  txt_ids=Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 5, 48)),
                  img_ids=Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 16, 4, 4)))

    def output(model):
        with torch.no_grad():
            return model.eval()(**inputs, return_dict=False)[0]

    expected = output(merged)
    base = shutil.copytree(pipeline, tmp_path / "base")
    write_model_index(base, "Flux2KleinPipeline")
    for fmt in get_family("flux2").export_formats:
        out = tmp_path / fmt
        assert main(["export", str(run), "--to", str(out), "--format", fmt]) == 0, capsys.readouterr().err
        if fmt == "merged":
            loaded = Flux2KleinPipeline.from_pretrained(out).transformer
        elif fmt == "unet":
            loaded = type(merged).from_pretrained(out)
        else:
            pipe = Flux2KleinPipeline.from_pretrained(base)
            pipe.load_lora_weights(out)
            loaded = pipe.transformer
        torch.testing.assert_close(output(loaded), expected, rtol=1e-5, atol=1e-5, msg=fmt)


def test_validation_grid_is_the_pipelines_own_decode(built, tmp_path):
    """The grid holds Flux2KleinPipeline's own decoded images (batch-norm statistics undone,
    latents unpatchified) for the same seeds."""
    from PIL import Image

    from mmalign.modalities.validation import sampling_pipeline, validate_images

    transformer, likelihood, _ = built
    out = validate_images(likelihood, transformer, 1, tmp_path, ["a red circle"], [0, 1], 2, 2.0)
    grid = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16)
    pipe = sampling_pipeline(likelihood, transformer)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with torch.no_grad():
        images = pipe(prompt=["a red circle"] * 2, generator=generators, num_inference_steps=2, guidance_scale=2.0,
                      height=16, width=16, output_type="np").images
    direct = np.concatenate([(im * 255).round().astype(np.int16) for im in images], axis=1)
    assert out["validation/images"] == 2 and np.abs(grid - direct).max() <= 1
