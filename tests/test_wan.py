"""The Wan text-to-video family (`wan`) on a tiny pipeline saved to disk (tests/wan_fixtures.py) and the
shipped video pairs (datasets/video_pairs), loaded through `build(cfg)`: video records (PyAV decoding,
frame sampling, one-line errors), the prompt against WanPipeline.encode_prompt, the transformer's
inputs against the pipeline's own denoising loop at the drawn σ, the Wan VAE's latent
normalisation, the ε - x0 target, the dpo convention, the flow shift, refusals and a 2-step train."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import flow_family_cases as cases
import numpy as np
import pytest
import torch
from diffusion_fixtures import build_for, draw_for
from flow_family_cases import prompts_of, recorded_call
from wan_fixtures import (SAMPLE, WIDTH, RecordingWan, copy_video_sample, fixed_sigma_scheduler, pipe_of,
                          sample_records, save_tiny_wan_pipeline, tiny_wan_transformer)

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.data.video import frame_indices, load_video, write_video
from mmalign.errors import DataError
from mmalign.losses import dpo_loss

ROOT = Path(__file__).resolve().parents[1]
DATA = SAMPLE / "train.jsonl"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipeline")


@pytest.fixture(scope="module")
def built(pipeline):
    return build_for(pipeline, DATA, "wan", num_frames=5)


@pytest.fixture(scope="module")
def records():
    return sample_records()


# -- video records -------------------------------------------------------------------------------------
def test_frame_indices_spread_evenly_over_the_clip():
    assert frame_indices(9, 5) == [0, 2, 4, 6, 8]
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(5, 5) == [0, 1, 2, 3, 4] and frame_indices(7, 1) == [0]


def test_mp4_and_frame_folder_decode_to_the_drawn_frames():
    """Sample clip 0 (chosen) is a red circle whose centre moves 2 px per frame from x = 8: frame k of
    5 sampled from 9 is decoded frame 2k, centre x = 8 + 4k; the frame folder (pair 3) reads the same."""
    frames = load_video("videos/0-chosen.mp4", "row 0, chosen", SAMPLE, num_frames=5)
    assert len(frames) == 5 and frames[0].size == (32, 32)
    for k, frame in enumerate(frames):
        row = np.asarray(frame, dtype=np.int16)[16]
        red = np.nonzero((row[:, 0] > 200) & (row[:, 1] < 80))[0]
        assert abs((red.min() + red.max()) / 2 - (8 + 4 * k)) <= 1, k
    folder = load_video("frames/3-chosen", "row 3, chosen", SAMPLE, num_frames=9)
    assert len(folder) == 9 and np.asarray(folder[4])[16, 16].tolist() == [255, 0, 0]  # red square, centred


def test_write_video_round_trips_through_pyav(tmp_path):
    frames = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    for t in range(5):
        frames[t, :, :, 0] = 50 * t  # red ramp over time
    for name in ("a.mp4", "a.webm"):
        path = write_video(frames, tmp_path / name, fps=8, codec="libx264" if name.endswith("mp4") else "libvpx-vp9")
        back = [np.asarray(f, dtype=np.int16) for f in load_video(str(path), "x")]
        assert len(back) == 5 and [round(b[..., 0].mean() / 50) for b in back] == [0, 1, 2, 3, 4], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a.webm"]  # no temporary left
    with pytest.raises(ValueError, match="even"):
        write_video(frames[:, :15], tmp_path / "odd.mp4")


def test_unreadable_videos_are_one_line_naming_the_row(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    (tmp_path / "frames").mkdir()
    (tmp_path / "empty").mkdir()
    from PIL import Image

    for t in range(5):
        Image.new("RGB", (8, 8)).save(tmp_path / "frames" / f"{t}.png")
    (tmp_path / "frames" / "2.png").write_bytes(b"broken")
    cases = [("missing.mp4", "does not exist"), ("bad.mp4", "unreadable video"), ("empty", "no frames"),
             ("frames", "unreadable frame"), (b"\x00\x01garbage", "unreadable video"), (3, "expected a video path")]
    for value, message in cases:
        with pytest.raises(DataError, match=f"^train.jsonl row 7, rejected: .*{message}") as info:
            load_video(value, "train.jsonl row 7, rejected", tmp_path, num_frames=5)
        assert "\n" not in str(info.value)
    assert len(load_video("frames", "row 1", tmp_path, num_frames=2)) == 2  # frames 0 and 4: 2.png is not read
    Image.new("RGB", (8, 6)).save(tmp_path / "frames" / "4.png")
    with pytest.raises(DataError, match="row 1: the frames differ in size \\(8x6, 8x8\\)"):
        load_video("frames", "row 1", tmp_path, num_frames=2)
    with pytest.raises(DataError, match="row 2, chosen: the video has 9 frames, fewer than diffusion.num_frames 13"):
        load_video("videos/0-chosen.mp4", "row 2, chosen", SAMPLE, num_frames=13)


def test_collate_names_the_bad_row(built, records, tmp_path):
    _, likelihood, _ = built
    bad = dict(records[1], rejected="videos/nope.mp4")
    with pytest.raises(DataError, match=r"row 1, rejected: video .*nope.mp4 does not exist"):
        likelihood.collate([records[0], bad], "pair")
    batch = likelihood.collate(records[:2], "pair")
    assert batch.inputs["pixel_values"].shape == (4, 3, 5, 16, 16)  # 32 px resized to 16, 5 frames


# -- (a) the prompt -------------------------------------------------------------------------------
def test_draw_conditioning_equals_the_pipeline_encode_prompt(built, records):
    transformer, likelihood, _ = built
    _, draw = draw_for(likelihood, records[:2])
    mine = draw.values["encoder_hidden_states"]
    expected, _ = pipe_of(likelihood, transformer).encode_prompt(prompts_of(records[:2]), do_classifier_free_guidance=False,
                                                                 device="cpu", max_sequence_length=512)
    assert mine.shape == (4, 512, 32) and mine[:, 6:].abs().max() == 0  # "a red circle moving right" + </s>
    assert mine[:, :6].abs().min() > 0
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6)
    # prompts of different lengths in one batch, messy whitespace cleaned, and the null prompt
    prompts = ["a  red circle\n moving", "star", ""]
    ours = likelihood.encode_text(prompts)["encoder_hidden_states"]
    theirs, _ = pipe_of(likelihood, transformer).encode_prompt(prompts, do_classifier_free_guidance=False,
                                                               device="cpu", max_sequence_length=512)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    _, negative = pipe_of(likelihood, transformer).encode_prompt(["star"], do_classifier_free_guidance=True,
                                                                 device="cpu", max_sequence_length=512)
    torch.testing.assert_close(ours[2:], negative, rtol=0, atol=1e-6)  # dropped captions: the default negative


# -- (b) the transformer call at the drawn σ --------------------------------------------------------
def test_transformer_sees_what_the_pipeline_loop_gives_it(built, records):
    """For each pair g: the pipeline (schedule [1, σ_g]; a 0 prediction leaves the latents as they
    are) calls the transformer on x_t at σ_g with the batch's prompts: exactly what the likelihood's
    call gives it (rows g and g + B), timestep σ·1000."""
    _, likelihood, _ = built
    mine, v, noisy = recorded_call(likelihood, records[:2], RecordingWan())
    assert mine["hidden_states"].shape == (4, 4, 2, 4, 4) and set(mine) == {"hidden_states", "timestep",
                                                                            "encoder_hidden_states"}
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingWan()
        pipe_of(likelihood, theirs, fixed_sigma_scheduler(float(v["sigmas"][g])))(
            prompt=prompts_of(records[:2]), latents=noisy, height=16, width=16, num_frames=5, guidance_scale=1.0,
            output_type="latent")
        their = theirs.calls[-1]
        torch.testing.assert_close(mine["hidden_states"][rows], their["hidden_states"][rows], rtol=0, atol=0)
        torch.testing.assert_close(mine["timestep"][rows], their["timestep"][rows], rtol=0, atol=1e-4)
        torch.testing.assert_close(mine["encoder_hidden_states"], their["encoder_hidden_states"], rtol=0, atol=1e-6)
    torch.testing.assert_close(mine["timestep"], v["sigmas"] * 1000)


def test_expand_timesteps_gives_one_timestep_per_token_as_the_ti2v_loop(built, records):
    from mmalign.families.wan import WanTransformer

    _, likelihood, _ = built
    batch, draw = draw_for(likelihood, records[:2])
    ours = RecordingWan()
    WanTransformer(expand_timesteps=True).predict(ours, torch.zeros(4, 4, 2, 4, 4), draw.values)
    sigma = float(draw.values["sigmas"][0])
    theirs = RecordingWan()
    pipe_of(likelihood, theirs, fixed_sigma_scheduler(sigma), expand_timesteps=True)(
        prompt=prompts_of(records[:2]), latents=torch.zeros(4, 4, 2, 4, 4), height=16, width=16, num_frames=5,
        guidance_scale=1.0, output_type="latent")
    assert ours.calls[0]["timestep"].shape == theirs.calls[-1]["timestep"].shape == (4, 8)  # 2·2·2 tokens
    torch.testing.assert_close(ours.calls[0]["timestep"][0], theirs.calls[-1]["timestep"][0], rtol=0, atol=1e-4)


def test_inputs_take_the_patch_embedding_dtype_with_fp32_lora_on_a_bf16_wan(tmp_path):
    """from_pretrained(bf16) keeps scale_shift_table (the FIRST parameter), the time embedder and the
    norms in float32 (`_keep_in_fp32_modules`), and peft's adapters are float32: without autocast,
    x_t and c go in as the patch embedding's bf16 (WanPipeline's `transformer.dtype`), not as the
    first parameter's float32 (which the bf16 patch-embedding conv refuses)."""
    import peft
    from diffusers import WanTransformer3DModel

    from mmalign.families.wan import WanTransformer, input_dtype

    torch.manual_seed(0)
    tiny_wan_transformer().save_pretrained(tmp_path)
    base = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert next(base.parameters()).dtype == torch.float32 and base.patch_embedding.weight.dtype == torch.bfloat16
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert input_dtype(model) == base.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    noisy, text = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 3, WIDTH, generator=g)
    values = {"timesteps": torch.tensor([900.0, 300.0]), "encoder_hidden_states": text}
    with torch.no_grad():
        out = WanTransformer().predict(model, noisy, values)
        want = model(hidden_states=noisy.to(base.dtype), timestep=values["timesteps"],
                     encoder_hidden_states=text.to(base.dtype), return_dict=False)[0]
    assert out.dtype == torch.float32 and out.shape == noisy.shape and out.abs().sum() > 0
    torch.testing.assert_close(out, want.float(), rtol=0, atol=0)


# -- (c) latents, logps and the sign of the target --------------------------------------------------
def test_latents_are_the_wan_vae_posterior_normalised_per_channel(built):
    _, likelihood, _ = built
    vae = likelihood.vae
    pixels = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = likelihood.latents.latent_dist(pixels)
    dist = vae.encode(pixels).latent_dist
    mu = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)  # the pipeline's latents_std
    torch.testing.assert_close(mean, (dist.mean - mu) * inv_std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, dist.std * inv_std, rtol=1e-5, atol=1e-6)
    assert mean.shape == (2, 4, 2, 4, 4) == (2, *likelihood.latents.latent_shape())


def test_logps_are_minus_half_mse_against_eps_minus_x0(built, records):
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, records)
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    s = sigma.view(-1, 1, 1, 1, 1)
    out = likelihood.logps(transformer, batch, draw)
    with torch.no_grad():  # by hand, as the pipeline calls it
        pred = transformer(hidden_states=(1 - s) * x0 + s * eps, timestep=sigma * 1000,
                           encoder_hidden_states=v["encoder_hidden_states"], return_dict=False)[0]
    cases.assert_minus_half_mse(out, (pred - (eps - x0)).pow(2).mean(dim=(1, 2, 3, 4)))

    class Oracle(RecordingWan):  # predicts ε - x0 exactly: error 0
        def forward(self, hidden_states, return_dict=True, **kwargs):
            return (eps - x0,)

    cases.assert_oracle_scores_zero(likelihood, Oracle(), batch, draw)


# -- (d) dpo at policy == reference -------------------------------------------------------------------
def test_dpo_is_log_2_when_policy_equals_reference(built, records):
    cases.dpo_is_log_2_at_policy_equals_reference(built, records, beta=500.0)


# -- the shift, the folder, the refusals -------------------------------------------------------------
def test_shift_is_the_schedulers_flow_shift_as_unipc_applies_it(built):
    from mmalign.modalities.flow import shift_sigmas

    _, likelihood, _ = built
    scheduler = likelihood.scheduler
    assert type(scheduler).__name__ == "UniPCMultistepScheduler" and likelihood.objective.shift == 3.0
    scheduler.set_timesteps(10)
    u = torch.from_numpy(np.linspace(1, 1 / 1000, 11)[:-1])
    expected = shift_sigmas(u, 3.0)
    expected[0] -= 1e-6  # UniPC keeps σ_0 off 1
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected, rtol=0, atol=1e-6)


def test_refusals(pipeline, tmp_path):
    from mmalign.families import family_for_folder

    assert family_for_folder(pipeline).name == "wan"
    with pytest.raises(ConfigError, match="num_frames 4: Wan's VAE takes 4k \\+ 1"):
        build_for(pipeline, DATA, "wan", num_frames=4)
    with pytest.raises(ConfigError, match="null_prompt: zeros"):
        build_for(pipeline, DATA, "wan", num_frames=5, null_prompt="zeros")
    with pytest.raises(ConfigError, match="not divisible"):
        build_for(pipeline, DATA, "wan", num_frames=5, resolution=12)
    with pytest.raises(ConfigError, match=r"train_experts \['low'\]: model.path .* has one transformer"):
        build_for(pipeline, DATA, "wan", num_frames=5, train_experts=["low"])
    two = tmp_path / "two"
    two.mkdir()
    (two / "transformer").symlink_to(pipeline / "transformer")
    (two / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875,
                                                      "expand_timesteps": True,
                                                      "transformer": ["diffusers", "WanTransformer3DModel"],
                                                      "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    with pytest.raises(ConfigError, match="two experts .* with expand_timesteps"):
        build_for(two, DATA, "wan", num_frames=5)


# -- cached == uncached --------------------------------------------------------------------------------
def cache_config(pipeline, train, cache_dir, **diffusion):
    from mmalign.config import Config, from_dict

    return from_dict(Config, {"modality": "wan", "model": {"path": str(pipeline)}, "data": {"train": str(train)},
                              "diffusion": dict({"resolution": 16, "num_frames": 5, "caption_dropout": 0.5,
                                                 "random_flip": True, "cache_dir": str(cache_dir),
                                                 "cache_dtype": "float32", "cache_shard_size": 2}, **diffusion),
                              "train": {"progress": False}})


def test_cached_likelihood_equals_the_uncached_one(pipeline, tmp_path):
    """`mmalign cache` writes each clip's normalised posterior (and its mirror's) and each caption's
    UMT5 states; training from it loads no VAE or text encoder and makes the same draw and logps."""
    import mmalign.modalities.cache_writer as cw
    from diffusion_fixtures import perturbed, uncached

    from mmalign.errors import CacheError
    from mmalign.modalities import build_modality
    from mmalign.modalities.diffusion import example_generators
    from mmalign.types import Draw

    train = copy_video_sample(tmp_path / "data")
    cfg = cache_config(pipeline, train, tmp_path / "c")
    model, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    model_c, cached, _ = build_modality(cfg)
    assert cached.vae is None and cached.text_encoders == [] and type(cached.latents).__name__ == "CachedLatents"
    assert cached.objective.shift == plain.objective.shift == 3.0
    records = [dict(json.loads(line), _root=str(train.parent), _index=i)
               for i, line in enumerate(train.read_text().splitlines())]
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    policy, dropped, flipped = perturbed(model), set(), set()
    for seed in range(3):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v.keys() == w.keys()
        for key in ("noise", "sigmas", "timesteps", "caption_dropped"):
            assert torch.equal(v[key], w[key]), key
        for key in v.keys() - {"noise", "sigmas", "timesteps", "caption_dropped"}:
            torch.testing.assert_close(w[key], v[key], rtol=0, atol=1e-5, msg=key)
        dropped.update(v["caption_dropped"].tolist())
        generators = example_generators(batch.index, torch.Generator().manual_seed(seed))
        flipped.update(plain.draw_choices("pair", 8, generators)[1].tolist())
        ref, ref_c = plain.logps(model, batch, Draw(v)), cached.logps(model_c, batch_c, Draw(w))
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6)
        pol, pol_c = plain.logps(policy, batch, Draw(v)), cached.logps(policy, batch_c, Draw(w))
        torch.testing.assert_close(dpo_loss(pol_c.pairs(), ref_c.pairs(), beta=100.0),
                                   dpo_loss(pol.pairs(), ref.pairs(), beta=100.0), rtol=0, atol=1e-4)
    assert dropped == flipped == {True, False}  # both caption paths and both cached mirrors were read
    with pytest.raises(CacheError, match="num_frames: cache 5, config 9"):
        build_modality(cache_config(pipeline, train, tmp_path / "c", num_frames=9))


# -- (e) the CLI: the tiny config trains 2 steps on the shipped video pairs ---------------------------
def test_tiny_config_trains_two_steps(pipeline, tmp_path):
    data = copy_video_sample(tmp_path / "pairs")
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "wan_dpo.yaml"), f"model.path={pipeline}",
                 f"data.train={data}", "train.max_steps=2", f"train.output_dir={run}", "train.progress=false",
                 "train.tensorboard=false", "train.log_every=1", "train.validate_every=2",
                 "diffusion.validation_steps=2", "diffusion.validation_prompts=[star]",
                 "diffusion.validation_seeds=[0]"]) == 0
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    rows = [r for r in logged if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["validation/videos"] for r in logged if "validation/videos" in r] == [1.0]
    grid = run / "validation" / "step_00000002"
    assert {p.name for p in grid.iterdir()} == {"grid.mp4", "grid.png", "grid.json"}
    assert len(load_video(str(grid / "grid.mp4"), "grid")) == 5
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["mse/policy"] != rows[-1]["mse/ref"]


# -- mmalign generate: mp4 videos with the manifest --------------------------------------------------
def test_generate_writes_mp4_videos_with_the_manifest(pipeline, tmp_path):
    """`mmalign generate` on a Wan folder samples videos through WanPipeline (one CPU generator per
    sample seed) and writes them as mp4: each decodes to the pipeline's own frames for its prompt and
    seed, sampled alone (H.264 rounding only), and the manifest records kind, fps and num_frames."""
    from mmalign.generate.images import load_pipeline
    from mmalign.generate.manifest import read_manifest
    from mmalign.generate.video import generate_videos

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    out = tmp_path / "out"
    args = ["generate", "--model", str(pipeline), "--prompts", str(prompts), "--out", str(out), "--num-samples", "2",
            "--batch-size", "2", "--no-progress", "--set", "num_inference_steps=2", "--set", "height=16", "--set",
            "width=16", "--set", "num_frames=5", "--set", "fps=8"]
    assert main(args) == 0
    rows = read_manifest(out)
    assert [r["kind"] for r in rows] == ["video"] * 2 and all(r["path"].endswith(".mp4") for r in rows)
    assert rows[0]["params"]["fps"] == 8 and rows[0]["params"]["num_frames"] == 5
    pipe = load_pipeline(pipeline)
    call = {k: v for k, v in rows[0]["params"].items() if k != "fps"}
    raw = generate_videos(pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows], call)
    alone = generate_videos(pipe, [rows[1]["prompt"]], [rows[1]["seed"]], call)[0]  # sampled alone: the same video
    assert np.abs(raw[1].astype(np.int16) - alone).max() <= 1
    luma = np.array([0.299, 0.587, 0.114])  # H.264 keeps luma at full size (yuv420p halves the chroma)
    decoded = [np.stack([np.asarray(f, dtype=np.float64) @ luma for f in load_video(str(out / r["path"]), r["id"])])
               for r in rows]
    errors = [float(np.abs(d - v @ luma).mean()) for d, v in zip(decoded, raw)]
    assert decoded[0].shape == (5, 16, 16) and max(errors) < 4  # crf 18 rounding (measured ~2.6)
    assert np.abs(decoded[0] - decoded[1]).mean() > 2 * max(errors)  # another seed: another video (~8.6)
    assert main(args) == 0 and read_manifest(out) == rows  # a rerun reuses every sample


# -- validation: a video grid and a frame contact sheet ------------------------------------------------
def test_validation_grid_is_the_pipelines_videos_tiled(built, tmp_path):
    """grid.mp4 frame k tiles frame k of every prompt × seed video WanPipeline samples (guided by
    guidance_scale with its default empty negative prompt, training's null prompt); grid.png shows
    each video's frames left to right; guidance changes the videos."""
    from PIL import Image

    from mmalign.generate.video import to_uint8
    from mmalign.modalities.validation import sampling_pipeline, validate_images

    transformer, likelihood, _ = built
    transformer = copy.deepcopy(transformer)
    cross = transformer.blocks[0].attn2
    with torch.no_grad():  # the random tiny model barely reads its 6 text tokens among 512: sharpen the
        for weight in (cross.norm_q.weight, cross.norm_k.weight, cross.to_out[0].weight):  # cross-attention
            weight.mul_(20)
    out = validate_images(likelihood, transformer, 1, tmp_path, ["a red circle"], [0, 1], 2, 3.0)
    assert out["validation/videos"] == 2
    layout = json.loads((tmp_path / "grid.json").read_text())
    assert layout["sheet_frames"] == [0, 1, 2, 3, 4] and layout["num_frames"] == 5

    def direct(prompt, **guidance):
        pipe = sampling_pipeline(likelihood, transformer)
        assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler.config.flow_shift == 3.0
        with torch.no_grad():
            frames = pipe(prompt=[prompt] * 2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                          num_inference_steps=2, height=16, width=16, num_frames=5, output_type="np",
                          **guidance).frames
        return [to_uint8(v).astype(np.int16) for v in frames]

    videos = direct("a red circle", guidance_scale=3.0)
    sheet = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16)  # lossless PNG: exact
    assert sheet.shape == (2 * 16, 5 * 16, 3)
    for i, video in enumerate(videos):
        for k in range(5):
            assert np.abs(sheet[16 * i : 16 * (i + 1), 16 * k : 16 * (k + 1)] - video[k]).max() <= 1, (i, k)
    luma = np.array([0.299, 0.587, 0.114])
    grid = np.stack([np.asarray(f, dtype=np.float64) @ luma for f in load_video(str(tmp_path / "grid.mp4"), "grid")])
    assert grid.shape == (5, 16, 32)  # one prompt row, two seed columns
    tiled = np.concatenate([video @ luma for video in videos], axis=2)
    assert np.abs(grid - tiled).mean() < 4  # H.264 rounding
    unguided = direct("a red circle", guidance_scale=1.0)
    assert np.abs(unguided[0] - videos[0]).mean() > 4  # guidance changed the videos
