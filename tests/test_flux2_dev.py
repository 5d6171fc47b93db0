"""The FLUX.2 [dev] family (`flux2_dev`) on a tiny pipeline saved to disk (tests/flux2_fixtures.py:
Mistral3 text encoder read at layers 10/20/30 through a PixtralProcessor, guidance embedding) and
loaded through `build(cfg)`: the prompt against Flux2Pipeline.encode_prompt, the transformer's
inputs (guidance included) against the pipeline's own denoising loop, logps against the training
script's formula, the dpo convention, cached == uncached, the folder recognition, the CLI (train,
export reloaded by Flux2Pipeline) and validation images equal to the pipeline's."""

from __future__ import annotations

import flow_family_cases as cases
import torch
from diffusion_fixtures import draw_for
from flow_family_cases import FlowFamilyCase, recorded_call, unshifted
from flux2_fixtures import RecordingFlux2, save_tiny_flux2_dev_pipeline, save_tiny_flux2_pipeline

from mmalign.families.flux2_dev import GUIDANCE_SCALE
from mmalign.modalities import build_modality

CASE = FlowFamilyCase(modality="flux2_dev", save_pipeline=save_tiny_flux2_dev_pipeline, pipeline_class="Flux2Pipeline",
                      tiny_config="flux2_dev_flow_dpo")
pipeline, built = cases.pipeline_and_built(CASE)
pairs = cases.pairs_fixture(CASE)


def pipe_of(likelihood, transformer, scheduler=None):
    return cases.pipe_of(CASE, likelihood, transformer, scheduler)


def test_conditioning_equals_the_pipeline_encode_prompt(built, pairs):
    from transformers import PixtralProcessor

    transformer, likelihood, _ = built
    assert isinstance(likelihood.tokenizers[0], PixtralProcessor)  # loaded as the pipeline loads it
    records = pairs["records"][:2]
    _, draw = draw_for(likelihood, records)
    embeds = draw.values["prompt_embeds"]
    assert embeds.shape == (4, 512, 48)  # 512 tokens, layers 10, 20, 30 of width 16 side by side
    expected, text_ids = pipe_of(likelihood, transformer).encode_prompt([r["prompt"] for r in records] * 2,
                                                                        device="cpu")
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert torch.equal(text_ids[0, :, 3], torch.arange(512))
    null, _ = pipe_of(likelihood, transformer).encode_prompt([""], device="cpu")
    torch.testing.assert_close(likelihood.encode_text([""])["prompt_embeds"], null, rtol=0, atol=0)
    # the system turn is there: a prompt's tokens start with [SYSTEM_PROMPT] after <s>
    ids = likelihood.conditioning.encoder.tokenize(["a red circle"])["input_ids"][0]
    tok = likelihood.tokenizers[0].tokenizer
    assert tok.convert_ids_to_tokens(ids[:2].tolist()) == ["<s>", "[SYSTEM_PROMPT]"]


def test_transformer_sees_what_the_pipeline_loop_gives_it_guidance_included(built, pairs):
    """The pipeline started at σ = 1 from x_t and stepped to the drawn σ_g (shift 1, a 0 prediction)
    calls the transformer on x_t at σ_g with guidance_scale 3.5 embedded: what the likelihood gives it."""
    _, likelihood, _ = built
    records = pairs["records"][:2]
    seen, v, noisy = recorded_call(likelihood, records, RecordingFlux2(guidance_embeds=True))
    euler = unshifted(likelihood, use_dynamic_shifting=False)
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingFlux2(guidance_embeds=True)
        pipe_of(likelihood, theirs, euler)(
            prompt=[records[g]["prompt"]] * 2, latents=noisy[rows], sigmas=[1.0, float(v["sigmas"][g])],
            height=16, width=16, guidance_scale=GUIDANCE_SCALE, output_type="latent")
        their = theirs.calls[-1]
        assert set(their) - {"joint_attention_kwargs"} == set(seen) - {"joint_attention_kwargs"}
        for key in ("hidden_states", "encoder_hidden_states", "txt_ids", "img_ids", "timestep", "guidance"):
            torch.testing.assert_close(seen[key][rows], their[key], rtol=0, atol=0, msg=key)
    assert torch.equal(seen["guidance"], torch.full((4,), 3.5))


def test_logps_are_the_training_scripts_loss(built, pairs):
    """train_dreambooth_lora_flux2.py: model_pred = transformer(packed x_t, timesteps / 1000, guidance
    3.5, ...)[:, :h·w], unpacked; target ε - x0; logp = -0.5 mse."""
    from diffusers import Flux2Pipeline as P

    transformer, likelihood, _ = built
    batch, draw, out = cases.scored(built, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    with torch.no_grad():
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
        ids, packed = P._prepare_latent_ids(noisy), P._pack_latents(noisy)
        pred = transformer(hidden_states=packed, timestep=v["timesteps"] / 1000,
                           guidance=torch.full([1], 3.5).expand(8), encoder_hidden_states=v["prompt_embeds"],
                           txt_ids=P._prepare_text_ids(v["prompt_embeds"]), img_ids=ids, return_dict=False)[0]
        pred = P._unpack_latents_with_ids(pred[:, : packed.size(1)], ids)
    mse = (pred - (eps - x0)).pow(2).mean(dim=(1, 2, 3))
    cases.assert_minus_half_mse(out, mse)
    torch.testing.assert_close(out.logps, -0.5 * mse, rtol=1e-5, atol=1e-6)


def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    cases.dpo_is_log_2_at_policy_equals_reference(built, pairs["records"])


def test_folder_recognition_tells_dev_from_klein(tmp_path):
    from mmalign.families import family_for_folder, family_for_pipeline

    assert family_for_folder(save_tiny_flux2_pipeline(tmp_path / "klein")).name == "flux2"
    assert family_for_pipeline("Flux2Pipeline").name == "flux2_dev"


def test_folder_recognition_and_refusals(pipeline, pairs):
    cases.folder_recognition_and_refusals(CASE, pipeline, pairs["path"])


def test_cached_likelihood_equals_the_uncached_one(pipeline, pairs, tmp_path):
    cases.cached_equals_uncached(CASE, pipeline, pairs["path"], pairs["records"], tmp_path / "c")


def test_cli_trains_and_exports_every_format(pipeline, pairs, tmp_path, capsys):
    from diffusers import Flux2Pipeline

    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=generator), timestep=torch.tensor([0.3]),
                  guidance=torch.tensor([3.5]), encoder_hidden_states=torch.randn(1, 5, 48, generator=generator),
                  txt_ids=Flux2Pipeline._prepare_text_ids(torch.zeros(1, 5, 48)),
                  img_ids=Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 16, 4, 4)))

    def output(model):
        with torch.no_grad():
            return model.eval()(**inputs, return_dict=False)[0]

    cases.cli_trains_and_exports_every_format(CASE, pipeline, pairs["path"], tmp_path, capsys, output)


def test_validation_grid_is_the_pipelines_own_images(built, tmp_path):
    cases.validation_grid_is_the_pipelines_own(built, tmp_path, 4.0, guidance_scale=4.0)


def test_validation_samples_a_bf16_transformer_beside_a_float32_vae(pipeline, pairs, tmp_path):
    """The recipes' model.dtype bfloat16 with diffusion.vae_dtype float32: Flux2Pipeline hands the VAE
    bf16 latents; validation decodes them in the VAE's float32 (it raised a dtype error before)."""
    from mmalign.config import Config, from_dict
    from mmalign.modalities.validation import validate_images

    cfg = from_dict(Config, {"modality": "flux2_dev", "model": {"path": str(pipeline), "dtype": "bfloat16"},
                             "data": {"train": str(pairs["path"])},
                             "diffusion": {"resolution": 16, "vae_dtype": "float32"}})
    transformer, likelihood, _ = build_modality(cfg)
    assert transformer.dtype == torch.bfloat16 and likelihood.vae.dtype == torch.float32
    out = validate_images(likelihood, transformer, 1, tmp_path, ["a red circle"], [0], 1, 4.0)
    assert out["validation/images"] == 1 and (tmp_path / "grid.png").is_file()
