"""The Z-Image family (`zimage`) on a tiny pipeline saved to disk (tests/zimage_fixtures.py) and
loaded through `build(cfg)`: the prompt against ZImagePipeline.encode_prompt, the transformer's
inputs against the pipeline's own denoising loop at the drawn σ, the x0 - ε target, the dpo
convention, the shift, validation images, and the CLI (train, export in every format)."""

from __future__ import annotations

import math

import flow_family_cases as cases
import pytest
import torch
from diffusion_fixtures import draw_for
from flow_family_cases import FlowFamilyCase, prompts_of, recorded_call, unshifted
from recording import RecordingTransformer
from zimage_fixtures import save_tiny_zimage_pipeline

from mmalign.modalities.flow import flow_shift

CASE = FlowFamilyCase(modality="zimage", save_pipeline=save_tiny_zimage_pipeline, pipeline_class="ZImagePipeline",
                      tiny_config="zimage_flow_dpo")
pipeline, built = cases.pipeline_and_built(CASE)
pairs = cases.pairs_fixture(CASE)


class RecordingZImage(RecordingTransformer):
    """Stands for ZImageTransformer2DModel: records (x, t, cap_feats) of every call and predicts 0
    (so the pipeline's Euler step leaves the latents unchanged)."""

    in_channels = 4

    def forward(self, x, t, cap_feats, return_dict=True, **kwargs):
        self.calls.append(([v.clone() for v in x], t.clone(), [c.clone() for c in cap_feats]))
        return ([torch.zeros_like(v) for v in x],)


def pipe_of(likelihood, transformer, scheduler=None):
    return cases.pipe_of(CASE, likelihood, transformer, scheduler)


# -- (a) the prompt -------------------------------------------------------------------------------
def test_draw_conditioning_equals_the_pipeline_encode_prompt(built, pairs):
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, pairs["records"][:2])
    embeds, mask = draw.values["prompt_embeds"], draw.values["prompt_mask"]
    assert embeds.shape == (4, 512, 32) and mask.dtype == torch.bool  # padded to max_sequence_length 512
    expected, _ = pipe_of(likelihood, transformer).encode_prompt(prompts_of(pairs["records"][:2]), device="cpu",
                                                                  do_classifier_free_guidance=False)
    for i in range(4):
        torch.testing.assert_close(embeds[i][mask[i]], expected[i], rtol=0, atol=0)
    # prompts of different lengths, and the null prompt as the pipeline's negative prompt
    prompts = ["star", "a photo of a green triangle"]
    cond = likelihood.encode_text(prompts + [""])
    positive, negative = pipe_of(likelihood, transformer).encode_prompt(prompts, device="cpu")
    got = [e[m] for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"])]
    assert [g.shape[0] for g in got] == [p.shape[0] for p in positive] + [negative[0].shape[0]]
    assert got[0].shape[0] < got[1].shape[0]
    for g, e in zip(got, [*positive, negative[0]]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# -- (b) the transformer call at the drawn σ --------------------------------------------------------
def test_transformer_sees_what_the_pipeline_loop_gives_it(built, pairs):
    """For each pair g: the pipeline, started at σ = 1 from latents x_t and stepped to the drawn
    σ_g (shift 1, so the schedule is [1, σ_g]; a 0 prediction leaves the latents as they are),
    calls the transformer on x_t at σ_g: exactly what the likelihood's call gives it."""
    _, likelihood, _ = built
    records = pairs["records"][:2]
    (x, t, caps), v, noisy = recorded_call(likelihood, records, RecordingZImage())
    euler = unshifted(likelihood)
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingZImage()
        pipe_of(likelihood, theirs, euler)(
            prompt=[records[g]["prompt"]] * 2, latents=noisy[rows], sigmas=[1.0, float(v["sigmas"][g])],
            height=16, width=16, guidance_scale=0.0, output_type="latent")
        their_x, their_t, their_caps = theirs.calls[-1]
        for ours_row, their_row in zip(rows, range(2)):
            assert x[ours_row].shape == (4, 1, 8, 8)  # (C, frames 1, h, w), unpatchified
            torch.testing.assert_close(x[ours_row], their_x[their_row], rtol=0, atol=0)
            torch.testing.assert_close(caps[ours_row], their_caps[their_row], rtol=0, atol=0)
        torch.testing.assert_close(t[rows], their_t, rtol=0, atol=0)  # (1000 - σ·1000) / 1000 = 1 - σ
    torch.testing.assert_close(t, 1 - v["sigmas"])


# -- (c) logps and the sign of the target -----------------------------------------------------------
def test_logps_are_minus_half_mse_against_x0_minus_eps(built, pairs):
    transformer, likelihood, _ = built
    batch, draw, out = cases.scored(built, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():  # by hand, as the pipeline calls it
        caps = [e[m] for e, m in zip(v["prompt_embeds"], v["prompt_mask"])]
        pred = transformer(list(((1 - s) * x0 + s * eps).unsqueeze(2).unbind(0)), 1 - sigma, caps,
                           return_dict=False)[0]
        pred = torch.stack(pred).squeeze(2)
    cases.assert_minus_half_mse(out, (pred - (x0 - eps)).pow(2).mean(dim=(1, 2, 3)))

    class Oracle(RecordingZImage):  # predicts x0 - ε exactly: the model's sign, error 0
        def forward(self, x, t, cap_feats, return_dict=True, **kwargs):
            return (list((x0 - eps).unsqueeze(2).unbind(0)),)

    cases.assert_oracle_scores_zero(likelihood, Oracle(), batch, draw)


# -- (d) dpo at policy == reference -------------------------------------------------------------------
def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    cases.dpo_is_log_2_at_policy_equals_reference(built, pairs["records"])


# -- the shift, the folder, the refusals, validation ----------------------------------------------
def test_shift_is_the_scheduler_configs(built):
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    _, likelihood, _ = built
    assert likelihood.objective.shift == 3.0  # Z-Image-Turbo's static shift; 16 px -> 4·4 image tokens
    dynamic = dict(likelihood.scheduler.config, use_dynamic_shifting=True)
    assert flow_shift(dynamic, 16) == pytest.approx(math.exp(calculate_shift(16, 256, 4096, 0.5, 1.15)))


def test_folder_recognition_and_refusals(pipeline, pairs):
    cases.folder_recognition_and_refusals(CASE, pipeline, pairs["path"])


def test_validation_grid_is_the_pipelines_own_images(built, tmp_path):
    """The grid holds ZImagePipeline's own decoded images for the same seeds, guided at scale 2."""
    cases.validation_grid_is_the_pipelines_own(built, tmp_path, 2.0, guidance_scale=2.0)


# -- cached == uncached --------------------------------------------------------------------------------
def test_cached_likelihood_equals_the_uncached_one(pipeline, pairs, tmp_path):
    cases.cached_equals_uncached(CASE, pipeline, pairs["path"], pairs["records"], tmp_path / "c")


# -- (e) the CLI: train, then export in every declared format -------------------------------------------
def test_cli_trains_and_exports_every_format(pipeline, pairs, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    x, caps = [torch.randn(4, 1, 8, 8, generator=generator)], [torch.randn(5, 32, generator=generator)]

    def output(model):
        with torch.no_grad():
            return model.eval()(x, torch.tensor([0.3]), caps, return_dict=False)[0][0]

    cases.cli_trains_and_exports_every_format(CASE, pipeline, pairs["path"], tmp_path, capsys, output)
