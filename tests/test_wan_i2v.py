"""Wan image-to-video (mmalign/families/_wan_i2v.py) on tiny WanImageToVideoPipeline folders (tests/wan_fixtures.py):
records {source_image, prompt, chosen, rejected}; the transformer's inputs (x_t with the first-frame condition and
mask channels, the CLIP image states, the prompt, t) against the pipeline's own denoising loop on the same draw,
for Wan 2.1 I2V (CLIP image encoder) and Wan 2.2 I2V A14B (no image encoder, two experts); logps, dpo at
policy == reference, and the refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusion_fixtures import build_for, draw_for
from PIL import Image
from test_wan import RecordingWan, fixed_sigma_scheduler
from wan_fixtures import CLIP_WIDTH, SAMPLE, i2v_records, save_tiny_wan_i2v_versions

from mmalign.config import ConfigError
from mmalign.errors import DataError
from mmalign.losses import dpo_loss

DATA = SAMPLE / "train.jsonl"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_i2v")
    return {**save_tiny_wan_i2v_versions(root), "records": i2v_records(root / "sources")}


class RecordingI2V(RecordingWan):
    """A recording I2V transformer (12 input channels, 4 out), velocity 0."""

    def __init__(self, image_dim=CLIP_WIDTH) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=12, patch_size=(1, 2, 2), image_dim=image_dim)

    def forward(self, hidden_states, return_dict=True, **kwargs):
        self.calls.append(dict(kwargs, hidden_states=hidden_states.clone()))
        return (torch.zeros_like(hidden_states[:, :4]),)


def i2v_pipe(likelihood, transformer, scheduler, **parts):
    from diffusers import WanImageToVideoPipeline

    image = likelihood.conditioning.image
    return WanImageToVideoPipeline(tokenizer=likelihood.tokenizers[0], text_encoder=likelihood.text_encoders[0],
                                   vae=likelihood.vae, scheduler=scheduler, transformer=transformer,
                                   image_encoder=image.image_encoder, image_processor=image.image_processor, **parts)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_transformer_sees_what_the_i2v_pipeline_loop_gives_it(folders, version):
    """Per pair g, WanImageToVideoPipeline with the pair's source image, schedule [1, σ_g] and x_t of rows
    g, g + B as its latents calls the transformer with exactly our call's inputs: [x_t, mask, first-frame
    latents] (12 channels), t = σ·1000, the prompt's 512 UMT5 states and (2.1) the CLIP image states."""
    records = folders["records"][:2]
    _, likelihood, _ = build_for(folders[version], DATA, "wan", num_frames=5)
    batch, draw = draw_for(likelihood, records)
    v = draw.values
    ours = RecordingI2V(CLIP_WIDTH if version == "2.1" else None)
    sigma = v["sigmas"].view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * v["latents"] + sigma * v["noise"]
    likelihood.logps(ours, batch, draw)
    mine = ours.calls[-1]
    assert mine["hidden_states"].shape == (4, 12, 2, 4, 4)
    assert ("encoder_hidden_states_image" in mine) == (version == "2.1")
    for g in range(2):
        rows, theirs = [g, g + 2], RecordingI2V(CLIP_WIDTH if version == "2.1" else None)
        i2v_pipe(likelihood, theirs, fixed_sigma_scheduler(float(v["sigmas"][g])))(
            image=Image.open(records[g]["source_image"]), prompt=[records[g]["prompt"]] * 2, latents=noisy[rows],
            height=16, width=16, num_frames=5, guidance_scale=1.0, output_type="latent")
        their = theirs.calls[-1]
        torch.testing.assert_close(mine["hidden_states"][rows], their["hidden_states"], rtol=0, atol=1e-6)
        torch.testing.assert_close(mine["timestep"][rows], their["timestep"], rtol=0, atol=1e-4)
        torch.testing.assert_close(mine["encoder_hidden_states"][rows], their["encoder_hidden_states"], rtol=0,
                                   atol=1e-6)
        if version == "2.1":
            assert their["encoder_hidden_states_image"].shape == (2, 17, CLIP_WIDTH)  # 4x4 patches + CLS
            torch.testing.assert_close(mine["encoder_hidden_states_image"][rows], their["encoder_hidden_states_image"],
                                       rtol=0, atol=1e-6)
        else:
            assert their["encoder_hidden_states_image"] is None
    condition = mine["hidden_states"][:, 4:]
    assert condition[:, :4, 0].eq(1).all() and condition[:, :4, 1:].eq(0).all()  # the mask: latent frame 0 only
    assert not torch.equal(condition[0, 4:], condition[1, 4:])  # each pair its own source image
    torch.testing.assert_close(condition[0], condition[2], rtol=0, atol=0)  # chosen and rejected share it


def test_non_square_condition_is_the_i2v_pipelines(folders):
    """diffusion.width 32 at resolution 16: the source image squashed to 16 x 32 as the pipeline's height / width
    do, so [x_t, condition] (12, 2, 4, 8) and the CLIP states equal WanImageToVideoPipeline's call at 16 x 32."""
    records = folders["records"][:1]
    _, likelihood, _ = build_for(folders["2.1"], DATA, "wan", num_frames=5, width=32)
    batch, draw = draw_for(likelihood, records)
    v = draw.values
    ours, theirs = RecordingI2V(), RecordingI2V()
    sigma = v["sigmas"].view(-1, 1, 1, 1, 1)
    likelihood.logps(ours, batch, draw)
    i2v_pipe(likelihood, theirs, fixed_sigma_scheduler(float(v["sigmas"][0])))(
        image=Image.open(records[0]["source_image"]), prompt=[records[0]["prompt"]] * 2,
        latents=(1 - sigma) * v["latents"] + sigma * v["noise"], height=16, width=32, num_frames=5, guidance_scale=1.0,
        output_type="latent")
    mine, their = ours.calls[-1], theirs.calls[-1]
    assert mine["hidden_states"].shape == (2, 12, 2, 4, 8)
    torch.testing.assert_close(mine["hidden_states"], their["hidden_states"], rtol=0, atol=1e-6)
    torch.testing.assert_close(mine["encoder_hidden_states_image"], their["encoder_hidden_states_image"], rtol=0,
                               atol=1e-6)


def test_logps_and_dpo_at_policy_equals_reference(folders):
    """logps = -0.5·mse of the I2V transformer called by hand on [x_t, condition]; the two-expert 2.2 folder
    builds a TwoExperts of I2V transformers; dpo at policy == reference is log 2."""
    from mmalign.modalities.experts import TwoExperts

    records = folders["records"]
    transformer, likelihood, _ = build_for(folders["2.1"], DATA, "wan", num_frames=5)
    batch, draw = draw_for(likelihood, records)
    v = draw.values
    s = v["sigmas"].view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        pred = transformer(hidden_states=torch.cat([(1 - s) * v["latents"] + s * v["noise"], v["condition"]], 1),
                           timestep=v["timesteps"], encoder_hidden_states=v["encoder_hidden_states"],
                           encoder_hidden_states_image=v["image_embeds"], return_dict=False)[0]
    out = likelihood.logps(transformer, batch, draw)
    mse = (pred - (v["noise"] - v["latents"])).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.diagnostics["mse"], mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dpo_loss(likelihood.logps(transformer, batch, draw).pairs(), out.pairs(), beta=500.0),
                               torch.full((4,), math.log(2)), rtol=0, atol=0)
    experts, likelihood22, _ = build_for(folders["2.2"], DATA, "wan", num_frames=5)
    assert isinstance(experts, TwoExperts) and experts.boundary == 900.0
    batch, draw = draw_for(likelihood22, records)
    assert "image_embeds" not in draw.values and draw.values["condition"].shape == (8, 8, 2, 4, 4)
    assert torch.isfinite(likelihood22.logps(experts, batch, draw).logps).all()


def test_i2v_refusals(folders, tmp_path):
    _, likelihood, _ = build_for(folders["2.1"], DATA, "wan", num_frames=5)
    bare = {k: v for k, v in folders["records"][1].items() if k != "source_image"}
    with pytest.raises(DataError, match="^row 1, source_image: image-to-video records need a 'source_image'"):
        likelihood.collate([folders["records"][0], bare], "pair")
    with pytest.raises(DataError, match="^row 0, source_image: unreadable image .*nope.png"):
        likelihood.collate([dict(folders["records"][0], source_image=str(tmp_path / "nope.png"))], "pair")
    with pytest.raises(ConfigError, match="Wan image-to-video: diffusion.random_flip .*not supported yet"):
        build_for(folders["2.1"], DATA, "wan", num_frames=5, random_flip=True)


def test_i2v_pairs_file_trains_and_exports_to_wan_image_to_video_pipeline(folders, tmp_path):
    """`mmalign train` on a pairs file with relative `source_image` paths (2 LoRA steps, log 2 at step 0);
    `--format merged` loads as WanImageToVideoPipeline (with its image encoder) and `--format lora` into it,
    both giving the trained transformer's output."""
    import json

    from diffusers import WanImageToVideoPipeline
    from wan_fixtures import copy_video_sample

    from mmalign.cli import main
    from mmalign.export import find_run, load_trained

    train = copy_video_sample(tmp_path / "pairs")
    rows = [dict(json.loads(line), source_image=f"sources/{i}.png") for i, line in enumerate(train.read_text().splitlines())]
    (tmp_path / "pairs" / "sources").mkdir()
    for i, record in enumerate(folders["records"]):
        Image.open(record["source_image"]).save(tmp_path / "pairs" / "sources" / f"{i}.png")
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["train", str(SAMPLE.parents[1] / "configs" / "tiny" / "wan_dpo.yaml"), f"model.path={folders['2.1']}",
                 f"data.train={train}", "train.max_steps=2", f"train.output_dir={run}", "train.progress=false",
                 "train.tensorboard=false", "train.log_every=1", "diffusion.random_flip=false", "optim.lr=1e-2"]) == 0
    losses = [r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    trained, _ = load_trained(find_run(run))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 12, 2, 4, 4, generator=g), timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 17, CLIP_WIDTH, generator=g), return_dict=False)
    with torch.no_grad():
        expected = trained(**inputs)[0]
        base = WanImageToVideoPipeline.from_pretrained(folders["2.1"]).transformer(**inputs)[0]
    assert (expected - base).abs().max() > 1e-5  # training moved it
    for fmt in ("merged", "lora"):
        assert main(["export", str(run), "--to", str(tmp_path / fmt), "--format", fmt]) == 0
    merged = WanImageToVideoPipeline.from_pretrained(tmp_path / "merged")
    lora = WanImageToVideoPipeline.from_pretrained(folders["2.1"])
    lora.load_lora_weights(tmp_path / "lora")
    assert merged.image_encoder is not None
    with torch.no_grad():
        for pipe in (merged, lora):
            torch.testing.assert_close(pipe.transformer(**inputs)[0], expected, rtol=1e-4, atol=1e-5)
