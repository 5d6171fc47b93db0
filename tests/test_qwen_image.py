"""The Qwen-Image family (`qwen_image`) on a tiny pipeline saved to disk (tests/qwen_image_fixtures.py)
and loaded through `build(cfg)`: the prompt against QwenImagePipeline.encode_prompt, the
transformer's inputs against the pipeline's own denoising loop at the drawn σ, the Qwen VAE's
latent normalisation, the packed ε - x0 target, the dpo convention, the dynamic shift, cached ==
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
from diffusion_fixtures import build_for, draw_for, indexed_pairs, perturbed, uncached, write_image_pairs
from qwen_image_fixtures import RecordingQwen, save_tiny_qwen_image_pipeline, tiny_qwen_tokenizer

from mmalign.cli import main
from mmalign.config import Config, ConfigError, from_dict
from mmalign.losses import dpo_loss
from mmalign.modalities.flow import pack_latents
from mmalign.types import Draw

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_qwen_image_pipeline(tmp_path_factory.mktemp("qwen_image") / "pipeline")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = indexed_pairs(tmp_path_factory.mktemp("pairs"))
    out["records"][1] = dict(out["records"][1], prompt="star")  # prompts of different lengths: a real mask
    return out


@pytest.fixture(scope="module")
def built(pipeline, pairs):
    return build_for(pipeline, pairs["path"], "qwen_image")


def pipe_of(likelihood, transformer, scheduler=None):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=scheduler or likelihood.scheduler, vae=likelihood.vae, transformer=transformer,
                             text_encoder=likelihood.text_encoders[0], tokenizer=likelihood.tokenizers[0])


def prompts_of(records):
    return [r["prompt"] for r in records] * 2  # chosen rows, then rejected rows


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
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, likelihood, _ = built
    records = pairs["records"][:2]
    batch, draw = draw_for(likelihood, records)
    ours = RecordingQwen()
    likelihood.logps(ours, batch, draw)
    mine = ours.calls[-1]
    v = draw.values
    sigma = v["sigmas"].view(-1, 1, 1, 1)
    noisy = pack_latents((1 - sigma) * v["latents"] + sigma * v["noise"])
    unshifted = FlowMatchEulerDiscreteScheduler.from_config(likelihood.scheduler.config, shift=1.0,
                                                            use_dynamic_shifting=False, shift_terminal=None)
    assert mine["hidden_states"].shape == (4, 16, 16) and mine["img_shapes"] == [[(1, 4, 4)]] * 4
    assert mine["guidance"] is None
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingQwen()
        pipe_of(likelihood, theirs, unshifted)(prompt=prompts_of(records), latents=noisy,
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
    batch, draw = draw_for(likelihood, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    s = sigma.view(-1, 1, 1, 1)
    out = likelihood.logps(transformer, batch, draw)
    embeds, mask = prompt_inputs(v, torch.float32)
    with torch.no_grad():  # by hand, as the pipeline calls it
        pred = transformer(hidden_states=pack_latents((1 - s) * x0 + s * eps), timestep=sigma,
                           encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                           img_shapes=[[(1, 4, 4)]] * 8, return_dict=False)[0]
    mse = (pred - pack_latents(eps - x0)).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(out.diagnostics["mse"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logps, -0.5 * out.diagnostics["mse"], rtol=0, atol=0)

    class Oracle(RecordingQwen):  # predicts ε - x0 exactly (packed): error 0
        def forward(self, hidden_states, return_dict=True, **kwargs):
            return (pack_latents(eps - x0),)

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
def test_shift_is_the_pipelines_dynamic_shift(built):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    _, likelihood, _ = built
    c = likelihood.scheduler.config  # 16 px -> 8x8 latents -> 4·4 packed tokens
    assert likelihood.objective.shift == pytest.approx(math.exp(calculate_shift(
        16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)))


def test_folder_recognition_and_refusals(pipeline, pairs):
    from mmalign.families import family_for_folder

    assert family_for_folder(pipeline).name == "qwen_image"
    with pytest.raises(ConfigError, match="null_prompt: zeros"):
        build_for(pipeline, pairs["path"], "qwen_image", null_prompt="zeros")
    with pytest.raises(ValueError, match="velocity"):
        build_for(pipeline, pairs["path"], "qwen_image", prediction_type="epsilon")


# -- cached == uncached --------------------------------------------------------------------------------
def test_cached_likelihood_equals_the_uncached_one(pipeline, tmp_path):
    import mmalign.modalities.cache_writer as cw
    from mmalign.modalities import build_modality

    records = write_image_pairs(tmp_path / "data", 4)
    for i, record in enumerate(records):
        record["prompt"] = ["a red circle", "star"][i % 2]
    train = tmp_path / "data" / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    records = [dict(r, _index=i) for i, r in enumerate(records)]
    cfg = from_dict(Config, {"modality": "qwen_image", "model": {"path": str(pipeline)}, "data": {"train": str(train)},
                             "diffusion": {"resolution": 16, "caption_dropout": 0.5, "cache_dir": str(tmp_path / "c"),
                                           "cache_dtype": "float32", "cache_shard_size": 2},
                             "train": {"progress": False}})
    model, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    model_c, cached, _ = build_modality(cfg)
    assert cached.vae is None and cached.text_encoders == [] and type(cached.latents).__name__ == "CachedLatents"
    stored = set(cached.latents.cache.file(cached.latents.cache.index["text"]["files"][0]).keys())
    assert {"ragged/prompt_embeds", "ragged/prompt_mask"} <= stored and "prompt_embeds" not in stored  # real lengths
    assert cached.objective.shift == plain.objective.shift
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    policy, dropped = perturbed(model), set()
    for seed in range(3):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v.keys() == w.keys()
        for key in ("noise", "sigmas", "timesteps", "caption_dropped", "latents"):
            assert torch.equal(v[key], w[key]), key
        for key in v.keys() - {"noise", "sigmas", "timesteps", "caption_dropped", "latents"}:
            torch.testing.assert_close(w[key], v[key], rtol=0, atol=1e-6, msg=key)
        dropped.update(v["caption_dropped"].tolist())
        ref, ref_c = plain.logps(model, batch, Draw(v)), cached.logps(model_c, batch_c, Draw(w))
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6)
        pol, pol_c = plain.logps(policy, batch, Draw(v)), cached.logps(policy, batch_c, Draw(w))
        torch.testing.assert_close(dpo_loss(pol_c.pairs(), ref_c.pairs(), beta=2000.0),
                                   dpo_loss(pol.pairs(), ref.pairs(), beta=2000.0), rtol=0, atol=1e-3)
    assert dropped == {True, False}


# -- (e) the CLI: train, then export in every declared format -------------------------------------------
def test_cli_trains_and_exports_every_format(pipeline, pairs, tmp_path, capsys):
    from diffusers import QwenImagePipeline

    from mmalign.export import find_run, load_trained, write_model_index
    from mmalign.families import get_family

    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "qwen_image_flow_dpo.yaml"), f"model.path={pipeline}",
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
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=generator), img_shapes=[[(1, 4, 4)]],
                  return_dict=False)

    def output(model):
        with torch.no_grad():
            return model.eval()(**inputs)[0]

    expected = output(merged)
    base = shutil.copytree(pipeline, tmp_path / "base")
    write_model_index(base, "QwenImagePipeline")
    for fmt in get_family("qwen_image").export_formats:
        out = tmp_path / fmt
        assert main(["export", str(run), "--to", str(out), "--format", fmt]) == 0, capsys.readouterr().err
        if fmt == "merged":
            loaded = QwenImagePipeline.from_pretrained(out).transformer
        elif fmt == "unet":
            loaded = type(merged).from_pretrained(out)
        else:
            pipe = QwenImagePipeline.from_pretrained(base)
            pipe.load_lora_weights(out)
            loaded = pipe.transformer
        torch.testing.assert_close(output(loaded), expected, rtol=1e-5, atol=1e-5, msg=fmt)


def test_validation_grid_is_the_pipelines_own_decode_with_true_cfg(built, tmp_path):
    """The grid holds QwenImagePipeline's own decoded images (per-channel mean/std, frame axis),
    guided by true_cfg_scale with the empty negative prompt; not the unguided images."""
    from PIL import Image

    from mmalign.modalities.validation import sampling_pipeline, validate_images

    transformer, likelihood, _ = built
    out = validate_images(likelihood, transformer, 1, tmp_path, ["a red circle"], [0, 1], 2, 3.0)
    grid = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16)
    assert out["validation/images"] == 2 and grid.shape[1] == 2 * grid.shape[0]

    def direct(**guidance):
        pipe = sampling_pipeline(likelihood, transformer)
        generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
        with torch.no_grad():
            images = pipe(prompt=["a red circle"] * 2, generator=generators, num_inference_steps=2, height=16,
                          width=16, output_type="np", **guidance).images
        return np.concatenate([(im * 255).round().astype(np.int16) for im in images], axis=1)

    assert np.abs(grid - direct(true_cfg_scale=3.0, negative_prompt="")).max() <= 1
    assert np.abs(grid - direct()).max() > 1  # guidance changed the images
