"""The FLUX.1-Kontext family (`flux_kontext`) on a tiny Kontext pipeline saved to disk
(tests/flux_kontext_fixtures.py) and loaded through `build(cfg)`: the source size against the
pipeline's auto-resize, the conditioning against FluxKontextPipeline.encode_prompt, the transformer's
inputs (target and source latents on one sequence, the source's ids offset to 1) against the
pipeline's own denoising loop at the drawn σ, logp by hand, the dpo convention, and the CLI (train the
tiny config, export in every format loaded back into the Kontext pipeline)."""

from __future__ import annotations

import flow_family_cases as cases
import torch
from flow_family_cases import EDIT_PAIRS, FlowFamilyCase, recorded_call, unshifted
from flow_fixtures import T5_TOKENS
from flux_kontext_fixtures import save_tiny_flux_kontext_pipeline
from recording import RecordingTransformer as RecordingFlux

from mmalign.modalities.flow import latent_image_ids, pack_latents
from mmalign.types import Draw

RES = 32  # 32×32 targets and sources -> 4×16×16 latents, 64 packed tokens each
CASE = FlowFamilyCase(modality="flux_kontext", save_pipeline=save_tiny_flux_kontext_pipeline,
                      pipeline_class="FluxKontextPipeline", tiny_config="flux_kontext_dpo", build={"resolution": RES},
                      edit=True, zeros_null_prompt=True,
                      recognised_as="flux")  # a bare FLUX folder stays FLUX (model_index names Kontext)
pipeline, built = cases.pipeline_and_built(CASE)
pairs = cases.pairs_fixture(CASE)


def pipe_of(likelihood, transformer, scheduler=None):
    return cases.pipe_of(CASE, likelihood, transformer, scheduler)


def test_source_size_is_the_pipelines_auto_resize_scaled():
    from mmalign.families.flux_kontext import kontext_size

    # 1000×750 (ratio 1.333): nearest preferred (1184, 880) (1.345; (1104, 944) is 1.169)
    assert kontext_size(1000, 750, 1024, 16) == (1184, 880)
    assert kontext_size(512, 512, 1024, 16) == (1024, 1024)
    assert kontext_size(300, 700, 1024, 16) == (672, 1568)  # 0.43: the tallest entry
    assert kontext_size(1000, 750, 512, 16) == (592, 432)  # halved: 592, 440 -> floored to 16: 432
    assert kontext_size(40, 40, RES, 4) == (32, 32)


# -- (a) conditioning and (b) the transformer call at the drawn σ -------------------------------------------
def test_transformer_sees_what_the_kontext_pipeline_loop_gives_it(built, pairs):
    """For each pair g: FluxKontextPipeline (shift 1, schedule [1, σ_g], a 0 prediction; the 32×32
    source taken as it is, _auto_resize off, since at resolution 32 our auto-resize gives 32×32) calls
    the transformer on [x_t; source latents] with img_ids [target (0, i, j); source (1, i, j)] at σ_g:
    exactly what the likelihood gives it (rows g and g + B)."""
    transformer, likelihood, _ = built
    records = pairs["records"][:2]
    mine, v, x_t = recorded_call(likelihood, records, RecordingFlux(transformer.config))
    noisy = pack_latents(x_t)
    source_ids = latent_image_ids(16, 16)
    source_ids[:, 0] = 1
    assert mine["hidden_states"].shape == (4, 128, 16)
    assert torch.equal(mine["img_ids"], torch.cat([latent_image_ids(16, 16), source_ids]))
    euler = unshifted(likelihood, use_dynamic_shifting=False)
    images = [likelihood.latents.image(r["source_image"], "test") for r in records] * 2
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingFlux(transformer.config)
        pipe_of(likelihood, theirs, euler)(prompt=[r["prompt"] for r in records] * 2, image=images,
                                           latents=noisy, sigmas=[1.0, float(v["sigmas"][g])], height=RES,
                                           width=RES, max_area=RES * RES, output_type="latent", _auto_resize=False,
                                           max_sequence_length=T5_TOKENS)
        their = theirs.calls[-1]
        torch.testing.assert_close(mine["hidden_states"][rows, :64], their["hidden_states"][rows, :64], rtol=0, atol=0)
        torch.testing.assert_close(mine["hidden_states"][rows, 64:], their["hidden_states"][rows, 64:],
                                   rtol=1e-5, atol=1e-5)  # the source latents (VAE per image vs batched)
        torch.testing.assert_close(mine["timestep"][rows], their["timestep"][rows], rtol=0, atol=0)  # σ
        for key in ("encoder_hidden_states", "pooled_projections"):  # FLUX's prompt: the image is not read
            torch.testing.assert_close(mine[key], their[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(mine["guidance"], their["guidance"])  # 3.5, the pipeline's default
        assert torch.equal(mine["img_ids"], their["img_ids"]) and torch.equal(mine["txt_ids"], their["txt_ids"])


# -- (c) logps by hand, dpo at policy == reference ------------------------------------------------------
def test_logps_are_minus_half_mse_of_the_target_tokens(built, pairs):
    """The formula of diffusers' train_dreambooth_lora_flux_kontext.py on the same draw: the source's
    VAE mode (z - shift)·scale packed after the packed noisy latents, img_ids [latent ids; cond ids with
    [..., 0] = 1], timestep σ, guidance 3.5, model_pred[:, :T] against noise - x0 (weighting "none"):
    its per-item mse is ours, and logp = -0.5 mse."""
    transformer, likelihood, _ = built
    batch, draw, out = cases.scored(built, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    s = sigma.view(-1, 1, 1, 1)
    vae = likelihood.vae
    pixels = torch.stack([likelihood.conditioning.encoder.prepare(likelihood.latents.image(r["source_image"], "t"))[1]
                          for r in pairs["records"]] * 2)
    with torch.no_grad():
        source = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        ids = latent_image_ids(16, 16)
        source_ids = ids.clone()
        source_ids[:, 0] = 1
        pred = transformer(hidden_states=torch.cat([pack_latents((1 - s) * x0 + s * eps), pack_latents(source)], 1),
                           timestep=sigma, guidance=torch.full((8,), 3.5), pooled_projections=v["pooled_projections"],
                           encoder_hidden_states=v["encoder_hidden_states"], txt_ids=torch.zeros(T5_TOKENS, 3),
                           img_ids=torch.cat([ids, source_ids]), return_dict=False)[0][:, :64]
    cases.assert_minus_half_mse(out, (pred - pack_latents(eps - x0)).pow(2).mean(dim=(1, 2)))
    blank = Draw(dict(v, source_latents=torch.zeros_like(v["source_latents"])))  # the source matters
    assert (likelihood.logps(transformer, batch, blank).logps - out.logps).abs().max() > 1e-6


def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    cases.dpo_is_log_2_at_policy_equals_reference(built, pairs["records"])


def test_folder_recognition_and_refusals(pipeline, pairs):
    cases.folder_recognition_and_refusals(CASE, pipeline, pairs["path"])


# -- (d) the CLI: the tiny config trains, then export in every declared format ---------------------------------
def test_cli_trains_the_tiny_config_and_exports_every_format(pipeline, tmp_path, capsys):
    """The tiny config on the shipped sample (datasets/edit_pairs), then every export format."""
    generator = torch.Generator().manual_seed(0)
    ids = latent_image_ids(8, 8)
    inputs = dict(hidden_states=torch.randn(1, 32, 16, generator=generator), timestep=torch.tensor([0.3]),
                  guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 96, generator=generator), txt_ids=torch.zeros(5, 3),
                  img_ids=torch.cat([ids, ids + torch.tensor([1.0, 0, 0])]), return_dict=False)

    def output(model):
        with torch.no_grad():
            return model.eval()(**inputs)[0]

    cases.cli_trains_and_exports_every_format(CASE, pipeline, EDIT_PAIRS, tmp_path, capsys, output)
