"""The Z-Image family (`zimage`) on a tiny pipeline saved to disk (tests/zimage_fixtures.py) and
loaded through `build(cfg)`: the prompt against ZImagePipeline.encode_prompt, the transformer's
inputs against the pipeline's own denoising loop at the drawn σ, the x0 - ε target, the dpo
convention, the shift, validation images, and the CLI (train, export in every format)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import build_for, draw_for, indexed_pairs
from recording import RecordingTransformer
from zimage_fixtures import save_tiny_zimage_pipeline

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.losses import dpo_loss
from mmalign.modalities.flow import flow_shift

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_zimage_pipeline(tmp_path_factory.mktemp("zimage") / "pipeline")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return indexed_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def built(pipeline, pairs):
    return build_for(pipeline, pairs["path"], "zimage")


class RecordingZImage(RecordingTransformer):
    """Stands for ZImageTransformer2DModel: records (x, t, cap_feats) of every call and predicts 0
    (so the pipeline's Euler step leaves the latents unchanged)."""

    in_channels = 4

    def forward(self, x, t, cap_feats, return_dict=True, **kwargs):
        self.calls.append(([v.clone() for v in x], t.clone(), [c.clone() for c in cap_feats]))
        return ([torch.zeros_like(v) for v in x],)

def pipe_of(likelihood, transformer, scheduler=None):
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=scheduler or likelihood.scheduler, vae=likelihood.vae, transformer=transformer,
                          text_encoder=likelihood.text_encoders[0], tokenizer=likelihood.tokenizers[0])


def prompts_of(records):
    return [r["prompt"] for r in records] * 2  # chosen rows, then rejected rows


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
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, likelihood, _ = built
    records = pairs["records"][:2]
    batch, draw = draw_for(likelihood, records)
    ours = RecordingZImage()
    likelihood.logps(ours, batch, draw)
    x, t, caps = ours.calls[-1]
    v = draw.values
    sigma = v["sigmas"].view(-1, 1, 1, 1)
    noisy = (1 - sigma) * v["latents"] + sigma * v["noise"]
    unshifted = FlowMatchEulerDiscreteScheduler.from_config(likelihood.scheduler.config, shift=1.0)
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingZImage()
        pipe_of(likelihood, theirs, unshifted)(
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
    batch, draw = draw_for(likelihood, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    s = sigma.view(-1, 1, 1, 1)
    out = likelihood.logps(transformer, batch, draw)
    with torch.no_grad():  # by hand, as the pipeline calls it
        caps = [e[m] for e, m in zip(v["prompt_embeds"], v["prompt_mask"])]
        pred = transformer(list(((1 - s) * x0 + s * eps).unsqueeze(2).unbind(0)), 1 - sigma, caps,
                           return_dict=False)[0]
        pred = torch.stack(pred).squeeze(2)
    mse = (pred - (x0 - eps)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.diagnostics["mse"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logps, -0.5 * out.diagnostics["mse"], rtol=0, atol=0)

    class Oracle(RecordingZImage):  # predicts x0 - ε exactly: the model's sign, error 0
        def forward(self, x, t, cap_feats, return_dict=True, **kwargs):
            return (list((x0 - eps).unsqueeze(2).unbind(0)),)

    assert likelihood.logps(Oracle(), batch, draw).diagnostics["mse"].abs().max().item() < 1e-12


# -- (d) dpo at policy == reference -------------------------------------------------------------------
def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, pairs["records"])
    reference = likelihood.logps(transformer, batch, draw)
    same = likelihood.logps(copy.deepcopy(transformer), batch, draw)
    loss = dpo_loss(same.pairs(), reference.pairs(), beta=2000.0)
    torch.testing.assert_close(loss, torch.full((4,), math.log(2)), rtol=0, atol=0)


# -- the shift, the folder, the refusals, validation ----------------------------------------------
def test_shift_is_the_scheduler_configs(built):
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    _, likelihood, _ = built
    assert likelihood.objective.shift == 3.0  # Z-Image-Turbo's static shift; 16 px -> 4·4 image tokens
    dynamic = dict(likelihood.scheduler.config, use_dynamic_shifting=True)
    assert flow_shift(dynamic, 16) == pytest.approx(math.exp(calculate_shift(16, 256, 4096, 0.5, 1.15)))


def test_folder_recognition_and_refusals(pipeline, pairs):
    from mmalign.families import family_for_folder

    assert family_for_folder(pipeline).name == "zimage"
    with pytest.raises(ConfigError, match="null_prompt: zeros"):
        build_for(pipeline, pairs["path"], "zimage", null_prompt="zeros")
    with pytest.raises(ValueError, match="velocity"):
        build_for(pipeline, pairs["path"], "zimage", prediction_type="epsilon")


def test_validation_samples_a_grid_with_zimage_pipeline(built, tmp_path):
    from mmalign.modalities.validation import validate_images

    transformer, likelihood, _ = built
    out = validate_images(likelihood, transformer, 1, tmp_path, ["a red circle"], [0, 1], 2, 2.0)
    assert out["validation/images"] == 2 and (tmp_path / "grid.png").is_file()


# -- (e) the CLI: train, then export in every declared format -------------------------------------------
def test_cli_trains_and_exports_every_format(pipeline, pairs, tmp_path, capsys):
    from diffusers import ZImagePipeline

    from mmalign.export import find_run, load_trained, write_model_index
    from mmalign.families import get_family

    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "zimage_flow_dpo.yaml"), f"model.path={pipeline}",
                 f"data.train={pairs['path']}", "train.max_steps=2", "train.batch_size=2", f"train.output_dir={run}",
                 "train.progress=false", "train.tensorboard=false", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["mse/policy"] != rows[-1]["mse/ref"]

    trained, _ = load_trained(find_run(run))
    merged = copy.deepcopy(trained).merge_and_unload().eval()
    generator = torch.Generator().manual_seed(0)
    x, caps = [torch.randn(4, 1, 8, 8, generator=generator)], [torch.randn(5, 32, generator=generator)]
    with torch.no_grad():
        expected = merged(x, torch.tensor([0.3]), caps, return_dict=False)[0][0]

    def output(model):
        with torch.no_grad():
            return model.eval()(x, torch.tensor([0.3]), caps, return_dict=False)[0][0]

    base = shutil.copytree(pipeline, tmp_path / "base")
    write_model_index(base, "ZImagePipeline")
    for fmt in get_family("zimage").export_formats:
        out = tmp_path / fmt
        assert main(["export", str(run), "--to", str(out), "--format", fmt]) == 0, capsys.readouterr().err
        if fmt == "merged":
            pipe = ZImagePipeline.from_pretrained(out)
            loaded = pipe.transformer
        elif fmt == "unet":
            loaded = type(merged).from_pretrained(out)
        else:
            pipe = ZImagePipeline.from_pretrained(base)
            pipe.load_lora_weights(out)
            loaded = pipe.transformer
        torch.testing.assert_close(output(loaded), expected, rtol=1e-5, atol=1e-5, msg=fmt)
