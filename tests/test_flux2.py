"""The FLUX.2 [klein] family (`flux2`) on a tiny pipeline saved to disk (tests/flux2_fixtures.py) and
loaded through `build(cfg)`: the prompt against Flux2KleinPipeline.encode_prompt, the latents against
its `_encode_vae_image` (patchify + batch-norm normalisation), the transformer's inputs against the
pipeline's own denoising loop at the drawn σ, the ε - x0 target, the dpo convention, cached ==
uncached, and the CLI (train, export in every format)."""

from __future__ import annotations

import flow_family_cases as cases
import pytest
import torch
from diffusion_fixtures import draw_for
from flow_family_cases import FlowFamilyCase, prompts_of, recorded_call, unshifted
from flux2_fixtures import RecordingFlux2, save_tiny_flux2_pipeline

from mmalign.modalities.flow import flow_shift

CASE = FlowFamilyCase(modality="flux2", save_pipeline=save_tiny_flux2_pipeline, pipeline_class="Flux2KleinPipeline",
                      tiny_config="flux2_flow_dpo")
pipeline, built = cases.pipeline_and_built(CASE)
pairs = cases.pairs_fixture(CASE)


def pipe_of(likelihood, transformer, scheduler=None):
    return cases.pipe_of(CASE, likelihood, transformer, scheduler)


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
    _, likelihood, _ = built
    records = pairs["records"][:2]
    seen, v, noisy = recorded_call(likelihood, records, RecordingFlux2())
    euler = unshifted(likelihood, use_dynamic_shifting=False)
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingFlux2()
        pipe_of(likelihood, theirs, euler)(
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
    batch, draw, out = cases.scored(built, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    with torch.no_grad():  # by hand, as the training script calls it (train_dreambooth_lora_flux2_klein.py)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
        ids = P._prepare_latent_ids(noisy)
        pred = transformer(hidden_states=P._pack_latents(noisy), timestep=sigma, guidance=None,
                           encoder_hidden_states=v["prompt_embeds"], txt_ids=P._prepare_text_ids(v["prompt_embeds"]),
                           img_ids=ids, return_dict=False)[0]
        pred = P._unpack_latents_with_ids(pred, ids)
    cases.assert_minus_half_mse(out, (pred - (eps - x0)).pow(2).mean(dim=(1, 2, 3)))

    class Oracle(RecordingFlux2):  # predicts ε - x0 exactly: error 0
        def forward(self, return_dict=True, **kwargs):
            return (P._pack_latents(eps - x0),)

    cases.assert_oracle_scores_zero(likelihood, Oracle(), batch, draw)


# -- (d) dpo at policy == reference -------------------------------------------------------------------
def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    cases.dpo_is_log_2_at_policy_equals_reference(built, pairs["records"])


# -- the shift, the folder, the refusals -------------------------------------------------------------
def test_shift_is_the_scheduler_configs_dynamic_shift_of_the_image_tokens(built):
    _, likelihood, _ = built
    assert likelihood.objective.shift == pytest.approx(flow_shift(likelihood.scheduler.config, 16))  # 4·4 tokens


def test_folder_recognition_and_refusals(pipeline, pairs):
    cases.folder_recognition_and_refusals(CASE, pipeline, pairs["path"])


# -- cached == uncached -------------------------------------------------------------------------------
def test_cached_likelihood_equals_the_uncached_one(pipeline, pairs, tmp_path):
    cases.cached_equals_uncached(CASE, pipeline, pairs["path"], pairs["records"], tmp_path / "c")


# -- (e) the CLI: train, then export in every declared format -------------------------------------------
def test_cli_trains_and_exports_every_format(pipeline, pairs, tmp_path, capsys):
    from diffusers import Flux2KleinPipeline

    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=generator), timestep=torch.tensor([0.3]),
                  encoder_hidden_states=torch.randn(1, 5, 48, generator=generator),
                  txt_ids=Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 5, 48)),
                  img_ids=Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 16, 4, 4)))

    def output(model):
        with torch.no_grad():
            return model.eval()(**inputs, return_dict=False)[0]

    cases.cli_trains_and_exports_every_format(CASE, pipeline, pairs["path"], tmp_path, capsys, output)


def test_validation_grid_is_the_pipelines_own_decode(built, tmp_path):
    """The grid holds Flux2KleinPipeline's own decoded images (batch-norm statistics undone,
    latents unpatchified) for the same seeds."""
    cases.validation_grid_is_the_pipelines_own(built, tmp_path, 2.0, guidance_scale=2.0)
