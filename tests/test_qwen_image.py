"""The Qwen-Image family (`qwen_image`) on a tiny pipeline saved to disk (tests/qwen_image_fixtures.py)
and loaded through `build(cfg)`: the prompt against QwenImagePipeline.encode_prompt, the
transformer's inputs against the pipeline's own denoising loop at the drawn σ, the Qwen VAE's
latent normalisation, the packed ε - x0 target, the dpo convention, the dynamic shift, cached ==
uncached, and the CLI (train, export in every format)."""

from __future__ import annotations

import json
import math

import flow_family_cases as cases
import pytest
import torch
from diffusion_fixtures import draw_for, indexed_pairs, write_image_pairs
from flow_family_cases import FlowFamilyCase, prompts_of, recorded_call, unshifted
from qwen_image_fixtures import RecordingQwen, save_tiny_qwen_image_pipeline, tiny_qwen_tokenizer

from mmalign.modalities.flow import pack_latents

CASE = FlowFamilyCase(modality="qwen_image", save_pipeline=save_tiny_qwen_image_pipeline,
                      pipeline_class="QwenImagePipeline", tiny_config="qwen_image_flow_dpo")
pipeline, built = cases.pipeline_and_built(CASE)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = indexed_pairs(tmp_path_factory.mktemp("pairs"))
    out["records"][1] = dict(out["records"][1], prompt="star")  # prompts of different lengths: a real mask
    return out


def pipe_of(likelihood, transformer, scheduler=None):
    return cases.pipe_of(CASE, likelihood, transformer, scheduler)


# -- (a) the prompt -------------------------------------------------------------------------------
def test_the_template_prefix_is_the_34_dropped_tokens():
    from mmalign.families.qwen_image import DROP, TEMPLATE

    tok = tiny_qwen_tokenizer()
    ids = tok(TEMPLATE.format("a red circle")).input_ids
    assert DROP == 34 and tok.convert_ids_to_tokens(ids[DROP:DROP + 3]) == ["a", "red", "circle"]


def test_draw_conditioning_equals_the_pipeline_encode_prompt(built, pairs):
    from mmalign.families.qwen_image import prompt_inputs

    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, pairs["records"][:2])
    assert draw.values["prompt_embeds"].shape == (4, 512, 32)  # padded to max_sequence_length 512
    embeds, mask = prompt_inputs(draw.values, torch.float32)
    expected, expected_mask = pipe_of(likelihood, transformer).encode_prompt(
        prompts_of(pairs["records"][:2]), device="cpu", max_sequence_length=512)
    assert mask is not None and mask.dtype == expected_mask.dtype  # "a red circle" vs "star"
    torch.testing.assert_close(mask, expected_mask, rtol=0, atol=0)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)
    # equal lengths: the pipeline's mask is None, so is ours; the null prompt as the negative prompt
    cond = likelihood.encode_text(["a red circle", "a blue square"])
    embeds, mask = prompt_inputs(cond, torch.float32)
    expected, expected_mask = pipe_of(likelihood, transformer).encode_prompt(["a red circle", "a blue square"],
                                                                            device="cpu", max_sequence_length=512)
    assert mask is None and expected_mask is None
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)
    null, _ = pipe_of(likelihood, transformer).encode_prompt([""], device="cpu")
    torch.testing.assert_close(prompt_inputs(likelihood.encode_text([""]), torch.float32)[0], null, rtol=0, atol=1e-6)


# -- (b) the transformer call at the drawn σ --------------------------------------------------------
def test_transformer_sees_what_the_pipeline_loop_gives_it(built, pairs):
    """For each pair g: the pipeline (shift 1, schedule [1, σ_g]; a 0 prediction leaves the latents
    as they are) calls the transformer on x_t at σ_g with the batch's prompts: exactly what the
    likelihood's call gives it (rows g and g + B)."""
    _, likelihood, _ = built
    records = pairs["records"][:2]
    mine, v, x_t = recorded_call(likelihood, records, RecordingQwen())
    noisy = pack_latents(x_t)
    euler = unshifted(likelihood, use_dynamic_shifting=False, shift_terminal=None)
    assert mine["hidden_states"].shape == (4, 16, 16) and mine["img_shapes"] == [[(1, 4, 4)]] * 4
    assert mine["guidance"] is None
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingQwen()
        pipe_of(likelihood, theirs, euler)(prompt=prompts_of(records), latents=noisy,
                                           sigmas=[1.0, float(v["sigmas"][g])], height=16, width=16,
                                           output_type="latent")
        their = theirs.calls[-1]
        torch.testing.assert_close(mine["hidden_states"][rows], their["hidden_states"][rows], rtol=0, atol=0)
        torch.testing.assert_close(mine["timestep"][rows], their["timestep"][rows], rtol=0, atol=0)  # σ
        torch.testing.assert_close(mine["encoder_hidden_states"], their["encoder_hidden_states"], rtol=0, atol=1e-6)
        torch.testing.assert_close(mine["encoder_hidden_states_mask"], their["encoder_hidden_states_mask"])
        assert mine["img_shapes"] == their["img_shapes"] and their["guidance"] is None
    torch.testing.assert_close(mine["timestep"], v["sigmas"])


# -- (c) latents, logps and the sign of the target --------------------------------------------------
def test_latents_are_the_qwen_vae_posterior_normalised_per_channel(built):
    _, likelihood, _ = built
    vae = likelihood.vae
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = likelihood.latents.latent_dist(pixels)
    dist = vae.encode(pixels.unsqueeze(2)).latent_dist  # (N, z, 1, h, w), as the edit pipeline encodes
    mu = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(mean, ((dist.mean - mu) * inv_std)[:, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, (dist.std * inv_std)[:, :, 0], rtol=1e-5, atol=1e-6)
    assert mean.shape == (2, 4, 8, 8) == (2, *likelihood.latents.latent_shape())
    assert likelihood.latents.latent_scaling() == (None, 1.0)


def test_logps_are_minus_half_mse_against_packed_eps_minus_x0(built, pairs):
    from mmalign.families.qwen_image import prompt_inputs

    transformer, likelihood, _ = built
    batch, draw, out = cases.scored(built, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    s = sigma.view(-1, 1, 1, 1)
    embeds, mask = prompt_inputs(v, torch.float32)
    with torch.no_grad():  # by hand, as the pipeline calls it
        pred = transformer(hidden_states=pack_latents((1 - s) * x0 + s * eps), timestep=sigma,
                           encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                           img_shapes=[[(1, 4, 4)]] * 8, return_dict=False)[0]
    cases.assert_minus_half_mse(out, (pred - pack_latents(eps - x0)).pow(2).mean(dim=(1, 2)))

    class Oracle(RecordingQwen):  # predicts ε - x0 exactly (packed): error 0
        def forward(self, hidden_states, return_dict=True, **kwargs):
            return (pack_latents(eps - x0),)

    cases.assert_oracle_scores_zero(likelihood, Oracle(), batch, draw)


# -- (d) dpo at policy == reference -------------------------------------------------------------------
def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    cases.dpo_is_log_2_at_policy_equals_reference(built, pairs["records"])


# -- the shift, the folder, the refusals -------------------------------------------------------------
def test_shift_is_the_pipelines_dynamic_shift(built):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    _, likelihood, _ = built
    c = likelihood.scheduler.config  # 16 px -> 8x8 latents -> 4·4 packed tokens
    assert likelihood.objective.shift == pytest.approx(math.exp(calculate_shift(
        16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)))


def test_folder_recognition_and_refusals(pipeline, pairs):
    cases.folder_recognition_and_refusals(CASE, pipeline, pairs["path"])


# -- cached == uncached --------------------------------------------------------------------------------
def test_cached_likelihood_equals_the_uncached_one(pipeline, tmp_path):
    """Prompts of two lengths: the text cache stores them ragged (their real lengths)."""
    records = write_image_pairs(tmp_path / "data", 4)
    for i, record in enumerate(records):
        record["prompt"] = ["a red circle", "star"][i % 2]
    train = tmp_path / "data" / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    records = [dict(r, _index=i) for i, r in enumerate(records)]
    _, cached = cases.cached_equals_uncached(CASE, pipeline, train, records, tmp_path / "c")
    stored = set(cached.latents.cache.file(cached.latents.cache.index["text"]["files"][0]).keys())
    assert {"ragged/prompt_embeds", "ragged/prompt_mask"} <= stored and "prompt_embeds" not in stored  # real lengths


# -- (e) the CLI: train, then export in every declared format -------------------------------------------
def test_cli_trains_and_exports_every_format(pipeline, pairs, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=generator), timestep=torch.tensor([0.3]),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=generator), img_shapes=[[(1, 4, 4)]],
                  return_dict=False)

    def output(model):
        with torch.no_grad():
            return model.eval()(**inputs)[0]

    cases.cli_trains_and_exports_every_format(CASE, pipeline, pairs["path"], tmp_path, capsys, output)


def test_validation_grid_is_the_pipelines_own_decode_with_true_cfg(built, tmp_path):
    """The grid holds QwenImagePipeline's own decoded images (per-channel mean/std, frame axis),
    guided by true_cfg_scale with the empty negative prompt; not the unguided images."""
    off = cases.validation_grid_is_the_pipelines_own(built, tmp_path, 3.0, true_cfg_scale=3.0, negative_prompt="")
    assert off() > 1  # guidance changed the images
