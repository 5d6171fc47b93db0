"""The Qwen-Image-Edit family (`qwen_image_edit`) on a tiny edit pipeline saved to disk
(tests/qwen_image_edit_fixtures.py) and loaded through `build(cfg)`: the conditioning against
QwenImageEditPipeline.encode_prompt WITH the source image, the transformer's inputs (target and
source latents on one sequence, both grids in img_shapes) against the pipeline's own denoising loop
at the drawn σ, logp by hand, the dpo convention, sources of mixed sizes, the refusals, and the CLI
(train the tiny config, export in every format loaded back into the edit pipeline)."""

from __future__ import annotations

import flow_family_cases as cases
import pytest
import torch
from diffusion_fixtures import build_for, draw_for, write_image
from flow_family_cases import EDIT_PAIRS, FlowFamilyCase, recorded_call, unshifted
from qwen_image_edit_fixtures import save_tiny_qwen_image_edit_pipeline
from qwen_image_fixtures import RecordingQwen

from mmalign.config import ConfigError
from mmalign.errors import CacheError, DataError
from mmalign.modalities.flow import pack_latents
from mmalign.types import Draw

RES = 32  # 32×32 targets and sources -> 4×16×16 latents, 64 packed tokens each
CASE = FlowFamilyCase(modality="qwen_image_edit", save_pipeline=save_tiny_qwen_image_edit_pipeline,
                      pipeline_class="QwenImageEditPipeline", tiny_config="qwen_image_edit_dpo",
                      build={"resolution": RES}, edit=True,
                      recognised_as="qwen_image")  # by layout alone (model_index names the edit pipeline)
pipeline, built = cases.pipeline_and_built(CASE)
pairs = cases.pairs_fixture(CASE)


def pipe_of(likelihood, transformer, scheduler=None):
    return cases.pipe_of(CASE, likelihood, transformer, scheduler, processor=likelihood.conditioning.encoder.processor)


def sources_of(likelihood, records):
    """The records' source images as loaded (PIL), chosen rows then rejected rows."""
    images = [likelihood.latents.image(r["source_image"], "test") for r in records]
    return images * 2


@pytest.fixture
def pipeline_area(monkeypatch):
    """The edit pipeline sizes a source to 1024² pixels; ours to resolution² (1024² at resolution
    1024): the pipeline's rule with our area, so the two see the same source."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as module

    original = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: original(RES * RES, ratio))


def test_source_size_is_the_pipelines_rule():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as theirs

    from mmalign.families.qwen_image_edit import DROP, calculate_dimensions

    assert DROP == 64
    for area, ratio in [(1024 * 1024, 1.0), (1024 * 1024, 4 / 3), (512 * 512, 9 / 16), (32 * 32, 1.5)]:
        assert calculate_dimensions(area, ratio) == theirs(area, ratio)[:2]
    assert calculate_dimensions(1024 * 1024, 4 / 3) == (1184, 896)  # √(1024²·4/3) = 1182.4 -> 37·32


# -- (a) the conditioning ---------------------------------------------------------------------------
def test_draw_conditioning_equals_the_edit_pipeline_encode_prompt(built, pairs, pipeline_area):
    """The instruction is read with the source image: the pipeline's encode_prompt(prompts, image)."""
    from mmalign.families.qwen_image import prompt_inputs

    transformer, likelihood, _ = built
    records = pairs["records"][:2]  # "make it red", "make the square blue": different lengths
    batch, draw = draw_for(likelihood, records)
    embeds, mask = prompt_inputs(draw.values, torch.float32)
    prompts = [r["prompt"] for r in records] * 2
    images = [likelihood.conditioning.encoder.prepare(im)[0] for im in sources_of(likelihood, records)]
    expected, expected_mask = pipe_of(likelihood, transformer).encode_prompt(prompts, image=images, device="cpu")
    assert expected_mask is not None and mask.dtype == expected_mask.dtype
    torch.testing.assert_close(mask, expected_mask, rtol=0, atol=0)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)
    # the image is in the condition: another source changes the embedding of the same instruction
    other = likelihood.conditioning.encoder.prepare(likelihood.latents.image(pairs["records"][1]["source_image"], "t"))
    moved = likelihood.conditioning.encoder.encode([prompts[0]], [[other[0]]])["prompt_embeds"]
    assert (moved[0, : mask[0].sum()] - embeds[0, : mask[0].sum()]).abs().max() > 1e-3


def test_a_dropped_caption_is_the_empty_instruction_about_the_same_source(pipeline, pairs, pipeline_area):
    """caption_dropout 1: every item's conditioning is the pipeline's negative prompt "" encoded WITH
    the record's source image (true CFG's unconditional branch); the source latents stay."""
    from mmalign.families.qwen_image import prompt_inputs

    transformer, likelihood, _ = build_for(pipeline, pairs["path"], "qwen_image_edit", resolution=RES,
                                           caption_dropout=1.0)
    records = pairs["records"][:2]
    batch, draw = draw_for(likelihood, records)
    assert draw.values["caption_dropped"].all()
    images = [likelihood.conditioning.encoder.prepare(im)[0] for im in sources_of(likelihood, records)]
    expected, _ = pipe_of(likelihood, transformer).encode_prompt([""] * 4, image=images, device="cpu")
    torch.testing.assert_close(prompt_inputs(draw.values, torch.float32)[0], expected, rtol=0, atol=1e-6)
    kept = draw_for(build_for(pipeline, pairs["path"], "qwen_image_edit", resolution=RES)[1], records)[1]
    torch.testing.assert_close(draw.values["source_latents"], kept.values["source_latents"], rtol=0, atol=0)


# -- (b) the transformer call at the drawn σ ----------------------------------------------------------
def test_transformer_sees_what_the_edit_pipeline_loop_gives_it(built, pairs, pipeline_area):
    """For each pair g: the pipeline (shift 1, schedule [1, σ_g]; a 0 prediction leaves the latents as
    they are) calls the transformer on [x_t; source latents] at σ_g with img_shapes [[target, source]]:
    exactly what the likelihood gives it (rows g and g + B)."""
    _, likelihood, _ = built
    records = pairs["records"][:2]
    mine, v, x_t = recorded_call(likelihood, records, RecordingQwen())
    noisy = pack_latents(x_t)
    euler = unshifted(likelihood, use_dynamic_shifting=False, shift_terminal=None)
    assert mine["hidden_states"].shape == (4, 128, 16) and mine["img_shapes"] == [[(1, 8, 8), (1, 8, 8)]] * 4
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingQwen()
        pipe_of(likelihood, theirs, euler)(prompt=[r["prompt"] for r in records] * 2,
                                           image=sources_of(likelihood, records), latents=noisy,
                                           sigmas=[1.0, float(v["sigmas"][g])], height=RES, width=RES,
                                           output_type="latent")
        their = theirs.calls[-1]
        torch.testing.assert_close(mine["hidden_states"][rows, :64], their["hidden_states"][rows, :64], rtol=0, atol=0)
        torch.testing.assert_close(mine["hidden_states"][rows, 64:], their["hidden_states"][rows, 64:],
                                   rtol=1e-5, atol=1e-5)  # the source latents (VAE per image vs batched)
        torch.testing.assert_close(mine["timestep"][rows], their["timestep"][rows], rtol=0, atol=0)  # σ
        torch.testing.assert_close(mine["encoder_hidden_states"], their["encoder_hidden_states"], rtol=0, atol=1e-6)
        torch.testing.assert_close(mine["encoder_hidden_states_mask"], their["encoder_hidden_states_mask"])
        assert mine["img_shapes"] == their["img_shapes"] and their["guidance"] is None
    torch.testing.assert_close(mine["timestep"], v["sigmas"])


# -- (c) logps by hand, dpo at policy == reference ------------------------------------------------------
def test_logps_are_minus_half_mse_of_the_target_tokens(built, pairs):
    from mmalign.families.qwen_image import prompt_inputs

    transformer, likelihood, _ = built
    batch, draw, out = cases.scored(built, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    s = sigma.view(-1, 1, 1, 1)
    embeds, mask = prompt_inputs(v, torch.float32)
    source = torch.stack([likelihood.conditioning.encoder.source_latents(
        likelihood.conditioning.encoder.prepare(likelihood.latents.image(r["source_image"], "t"))[1][None])[0]
        for r in pairs["records"]] * 2)
    with torch.no_grad():  # by hand, as the pipeline calls it
        pred = transformer(hidden_states=torch.cat([pack_latents((1 - s) * x0 + s * eps), pack_latents(source)], 1),
                           timestep=sigma, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                           img_shapes=[[(1, 8, 8), (1, 8, 8)]] * 8, return_dict=False)[0][:, :64]
    cases.assert_minus_half_mse(out, (pred - pack_latents(eps - x0)).pow(2).mean(dim=(1, 2)))
    blank = Draw(dict(v, source_latents=torch.zeros_like(v["source_latents"])))  # the source matters
    assert (likelihood.logps(transformer, batch, blank).logps - out.logps).abs().max() > 1e-6


def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    cases.dpo_is_log_2_at_policy_equals_reference(built, pairs["records"])


def test_sources_of_mixed_sizes_score_as_they_score_alone(built, pairs, tmp_path):
    """A 72×24 source (ratio 3 at area 32²: √3072 = 55.4 -> 64 wide, 18.5 -> 32 high, a 16×32 latent,
    an 8×16 packed grid) beside a 32×32 one: one transformer call per grid, each equal to its batch alone."""
    transformer, likelihood, _ = built
    wide = write_image(tmp_path / "wide.png", 72, 24, seed=5)
    records = [pairs["records"][0], dict(pairs["records"][1], source_image=str(wide))]
    assert likelihood.conditioning.encoder.prepare(likelihood.latents.image(str(wide), "t"))[0].size == (64, 32)
    batch, draw = draw_for(likelihood, records)
    assert draw.values["source_shapes"][:, 0].tolist() == [[8, 8], [8, 16]] * 2
    assert draw.values["source_latents"].shape == (4, 128, 16)  # zero-padded to the longest
    recording = RecordingQwen()
    likelihood.logps(recording, batch, draw)
    assert [c["img_shapes"] for c in recording.calls] == [[[(1, 8, 8), (1, 8, 8)]] * 2, [[(1, 8, 8), (1, 8, 16)]] * 2]
    both = likelihood.logps(transformer, batch, draw).logps
    for g, record in enumerate(records):
        alone_batch, alone_draw = draw_for(likelihood, [record])
        rows = [g, g + 2]
        torch.testing.assert_close(alone_draw.values["noise"], draw.values["noise"][rows])  # seeded per data row
        torch.testing.assert_close(likelihood.logps(transformer, alone_batch, alone_draw).logps, both[rows],
                                   rtol=1e-5, atol=1e-6)


# -- refusals ---------------------------------------------------------------------------------------
def test_refusals(pipeline, pairs, built, tmp_path):
    cases.folder_recognition_and_refusals(CASE, pipeline, pairs["path"])  # null_prompt zeros, epsilon
    with pytest.raises(ConfigError, match="random_flip"):
        build_for(pipeline, pairs["path"], "qwen_image_edit", resolution=RES, random_flip=True)
    with pytest.raises(CacheError, match="no complete cache"):  # the cache: tests/test_edit_cache.py
        build_for(pipeline, pairs["path"], "qwen_image_edit", resolution=RES, cache_dir=str(tmp_path))
    _, likelihood, _ = built
    bare = {k: v for k, v in pairs["records"][0].items() if k != "source_image"}
    with pytest.raises(DataError, match="row 0: an edit record needs 'source_image'"):
        likelihood.collate([bare], "pair")
    with pytest.raises(DataError, match="at most 1"):
        likelihood.collate([dict(bare, source_images=[pairs["records"][0]["source_image"]] * 2)], "pair")


# -- (d) the CLI: the tiny config trains, then export in every declared format -------------------------------
def test_cli_trains_the_tiny_config_and_exports_every_format(pipeline, tmp_path, capsys):
    """The tiny config on the shipped sample (datasets/edit_pairs), then every export format."""
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 32, 16, generator=generator), timestep=torch.tensor([0.3]),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=generator),
                  img_shapes=[[(1, 4, 4), (1, 4, 4)]], return_dict=False)

    def output(model):
        with torch.no_grad():
            return model.eval()(**inputs)[0]

    cases.cli_trains_and_exports_every_format(CASE, pipeline, EDIT_PAIRS, tmp_path, capsys, output)
