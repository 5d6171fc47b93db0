"""The FLUX.1-Kontext family (`flux_kontext`) on a tiny Kontext pipeline saved to disk
(tests/flux_kontext_fixtures.py) and loaded through `build(cfg)`: the source size against the
pipeline's auto-resize, the conditioning against FluxKontextPipeline.encode_prompt, the transformer's
inputs (target and source latents on one sequence, the source's ids offset to 1) against the
pipeline's own denoising loop at the drawn σ, logp by hand, the dpo convention, and the CLI (train the
tiny config, export in every format loaded back into the Kontext pipeline)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import build_for, draw_for
from flow_fixtures import T5_TOKENS
from flux_kontext_fixtures import save_tiny_flux_kontext_pipeline
from qwen_image_edit_fixtures import write_edit_pairs
from recording import RecordingTransformer as RecordingFlux

from mmalign.cli import main
from mmalign.losses import dpo_loss
from mmalign.modalities.flow import latent_image_ids, pack_latents
from mmalign.types import Draw

ROOT = Path(__file__).resolve().parents[1]
RES = 32  # 32×32 targets and sources -> 4×16×16 latents, 64 packed tokens each


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_flux_kontext_pipeline(tmp_path_factory.mktemp("flux_kontext") / "pipeline")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = write_edit_pairs(tmp_path_factory.mktemp("edit_pairs"), 4)
    return {"path": path, "records": [dict(json.loads(line), _index=i) for i, line in enumerate(open(path))]}


@pytest.fixture(scope="module")
def built(pipeline, pairs):
    return build_for(pipeline, pairs["path"], "flux_kontext", resolution=RES)


def pipe_of(likelihood, transformer, scheduler=None):
    from diffusers import FluxKontextPipeline

    enc, tok = likelihood.text_encoders, likelihood.tokenizers
    return FluxKontextPipeline(scheduler=scheduler or likelihood.scheduler, vae=likelihood.vae, text_encoder=enc[0],
                               tokenizer=tok[0], text_encoder_2=enc[1], tokenizer_2=tok[1], transformer=transformer)


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
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer, likelihood, _ = built
    records = pairs["records"][:2]
    batch, draw = draw_for(likelihood, records)
    ours = RecordingFlux(transformer.config)
    likelihood.logps(ours, batch, draw)
    mine, v = ours.calls[-1], draw.values
    sigma = v["sigmas"].view(-1, 1, 1, 1)
    noisy = pack_latents((1 - sigma) * v["latents"] + sigma * v["noise"])
    source_ids = latent_image_ids(16, 16)
    source_ids[:, 0] = 1
    assert mine["hidden_states"].shape == (4, 128, 16)
    assert torch.equal(mine["img_ids"], torch.cat([latent_image_ids(16, 16), source_ids]))
    unshifted = FlowMatchEulerDiscreteScheduler.from_config(likelihood.scheduler.config, shift=1.0,
                                                            use_dynamic_shifting=False)
    images = [likelihood.latents.image(r["source_image"], "test") for r in records] * 2
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingFlux(transformer.config)
        pipe_of(likelihood, theirs, unshifted)(prompt=[r["prompt"] for r in records] * 2, image=images,
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
    batch, draw = draw_for(likelihood, pairs["records"])
    v = draw.values
    x0, eps, sigma = v["latents"], v["noise"], v["sigmas"]
    s = sigma.view(-1, 1, 1, 1)
    out = likelihood.logps(transformer, batch, draw)
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
    mse = (pred - pack_latents(eps - x0)).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(out.diagnostics["mse"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logps, -0.5 * out.diagnostics["mse"], rtol=0, atol=0)
    blank = Draw(dict(v, source_latents=torch.zeros_like(v["source_latents"])))  # the source matters
    assert (likelihood.logps(transformer, batch, blank).logps - out.logps).abs().max() > 1e-6


def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, pairs["records"])
    reference = likelihood.logps(transformer, batch, draw)
    same = likelihood.logps(copy.deepcopy(transformer), batch, draw)
    loss = dpo_loss(same.pairs(), reference.pairs(), beta=2000.0)
    torch.testing.assert_close(loss, torch.full((4,), math.log(2)), rtol=0, atol=0)


# -- (d) the CLI: the tiny config trains, then export in every declared format ---------------------------------
def test_cli_trains_the_tiny_config_and_exports_every_format(pipeline, tmp_path, capsys):
    """The tiny config on the shipped sample (datasets/edit_pairs), then every export format."""
    from diffusers import FluxKontextPipeline

    from mmalign.export import find_run, load_trained
    from mmalign.families import family_for_folder, get_family

    assert family_for_folder(pipeline).name == "flux"  # a bare FLUX folder stays FLUX (model_index names Kontext)
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "flux_kontext_dpo.yaml"), f"model.path={pipeline}",
                 f"data.train={ROOT / 'datasets' / 'edit_pairs' / 'train.jsonl'}", "train.max_steps=2", "train.batch_size=2", f"train.output_dir={run}",
                 "train.progress=false", "train.tensorboard=false", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["mse/policy"] != rows[-1]["mse/ref"]

    trained, _ = load_trained(find_run(run))
    merged = copy.deepcopy(trained).merge_and_unload().eval()
    generator = torch.Generator().manual_seed(0)
    ids = latent_image_ids(8, 8)
    inputs = dict(hidden_states=torch.randn(1, 32, 16, generator=generator), timestep=torch.tensor([0.3]),
                  guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 96, generator=generator), txt_ids=torch.zeros(5, 3),
                  img_ids=torch.cat([ids, ids + torch.tensor([1.0, 0, 0])]), return_dict=False)

    def output(model):
        with torch.no_grad():
            return model.eval()(**inputs)[0]

    expected = output(merged)
    assert (expected - output(FluxKontextPipeline.from_pretrained(pipeline).transformer)).abs().max() > 1e-6
    for fmt in get_family("flux_kontext").export_formats:
        out = tmp_path / fmt
        assert main(["export", str(run), "--to", str(out), "--format", fmt]) == 0, capsys.readouterr().err
        if fmt == "merged":
            loaded = FluxKontextPipeline.from_pretrained(out).transformer
        elif fmt == "unet":
            loaded = type(merged).from_pretrained(out)
        else:
            pipe = FluxKontextPipeline.from_pretrained(pipeline)
            pipe.load_lora_weights(out)
            loaded = pipe.transformer
        torch.testing.assert_close(output(loaded), expected, rtol=1e-5, atol=1e-5, msg=fmt)
