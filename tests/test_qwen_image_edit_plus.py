"""The Qwen-Image-Edit-Plus family (`qwen_image_edit_plus`, multi-source) on a tiny edit pipeline saved
with QwenImageEditPlusPipeline's model_index (tests/qwen_image_edit_fixtures.py): each record's two
sources sized twice (VL condition area, VAE area), the conditioning against the pipeline's
encode_prompt with both images ("Picture 1: ... Picture 2: ..."), the transformer's inputs against
the pipeline's own loop (target then both sources on the sequence, three grids in img_shapes), and
the dpo convention."""

from __future__ import annotations

import copy
import json

import flow_family_cases as cases
import pytest
import torch
from diffusion_fixtures import build_for, draw_for, write_image
from qwen_image_edit_fixtures import EDITS, save_tiny_qwen_image_edit_pipeline
from qwen_image_fixtures import RecordingQwen

from mmalign.modalities.flow import pack_latents

RES = 64  # VAE area 64² (sources 64×64 or 96×32), condition area 64²·(384/1024)² = 24² -> 32×32 VL images


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_qwen_image_edit_pipeline(tmp_path_factory.mktemp("plus") / "pipeline",
                                              pipeline="QwenImageEditPlusPipeline")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Two records, each with two sources: a 64×64 one and a 96×48 one (ratio 2: a 96×32 VAE size)."""
    root = tmp_path_factory.mktemp("plus_pairs")
    records = []
    for i in range(2):
        names = {k: write_image(root / f"{i}_{k}.png", *size, seed=5 * i + j).name for j, (k, size) in
                 enumerate({"a": (64, 64), "b": (96, 48), "chosen": (64, 64), "rejected": (64, 64)}.items())}
        records.append({"source_images": [names["a"], names["b"]], "prompt": EDITS[i], "chosen": names["chosen"],
                        "rejected": names["rejected"]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"path": path, "records": [dict(r, _index=i) for i, r in enumerate(records)]}


@pytest.fixture(scope="module")
def built(pipeline, pairs):
    return build_for(pipeline, pairs["path"], "qwen_image_edit_plus", resolution=RES)


@pytest.fixture
def pipeline_areas(monkeypatch):
    """The Plus pipeline sizes sources to 384² (VL) and 1024² (VAE) pixels; ours scale both by
    (resolution / 1024)²: the pipeline with our areas."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module

    monkeypatch.setattr(module, "CONDITION_IMAGE_SIZE", round(RES * RES * 384 * 384 / 1024 ** 2))
    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", RES * RES)


def pipe_of(likelihood, transformer, scheduler=None):
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline(scheduler=scheduler or likelihood.scheduler, vae=likelihood.vae,
                                     transformer=transformer, text_encoder=likelihood.text_encoders[0],
                                     tokenizer=likelihood.tokenizers[0],
                                     processor=likelihood.conditioning.encoder.processor)


def sources(likelihood, record):
    return [likelihood.latents.image(v, "test") for v in record["source_images"]]


def test_each_source_is_sized_for_the_vl_encoder_and_the_vae(built, pairs):
    _, likelihood, _ = built
    prepared = [likelihood.conditioning.encoder.prepare(im) for im in sources(likelihood, pairs["records"][0])]
    assert [p[0].size for p in prepared] == [(32, 32), (32, 32)]  # 24² condition area; ratio 2: 34 -> 32, 17 -> 32
    assert [tuple(p[1].shape) for p in prepared] == [(3, 64, 64), (3, 32, 96)]  # 64² VAE area; ratio 2: 96 × 32


def test_a_resolution_too_small_for_the_condition_area_is_refused(built, pairs):
    from mmalign.config import ConfigError

    _, likelihood, _ = built
    encoder = copy.copy(likelihood.conditioning.encoder)
    encoder.area = 32 * 32  # resolution 32: condition area 12², whose 32-multiple sides round to 0
    with pytest.raises(ConfigError, match="rounds to 0x0; raise the resolution"):
        encoder.prepare(sources(likelihood, pairs["records"][0])[0])


def test_conditioning_and_transformer_inputs_equal_the_plus_pipeline(built, pairs, pipeline_areas):
    """Per record g (the pipeline takes one prompt at a time): its encode_prompt with both images, then
    its loop (shift 1, schedule [1, σ_g], a 0 prediction) on [x_t; source 1; source 2]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmalign.families.qwen_image import prompt_inputs

    transformer, likelihood, _ = built
    records = pairs["records"]
    batch, draw = draw_for(likelihood, records)
    ours = RecordingQwen()
    likelihood.logps(ours, batch, draw)
    assert len(ours.calls) == 1  # both records' sources have the same grids: one call
    mine, v = ours.calls[-1], draw.values
    grids = [(1, 16, 16), (1, 16, 16), (1, 8, 24)]
    assert mine["img_shapes"] == [grids] * 4 and mine["hidden_states"].shape == (4, 256 + 256 + 192, 16)
    sigma = v["sigmas"].view(-1, 1, 1, 1)
    noisy = pack_latents((1 - sigma) * v["latents"] + sigma * v["noise"])
    unshifted = FlowMatchEulerDiscreteScheduler.from_config(likelihood.scheduler.config, shift=1.0,
                                                            use_dynamic_shifting=False, shift_terminal=None)
    for g, record in enumerate(records):
        pipe = pipe_of(likelihood, transformer)
        vl = [likelihood.conditioning.encoder.prepare(im)[0] for im in sources(likelihood, record)]
        expected, _ = pipe.encode_prompt([record["prompt"]], image=vl, device="cpu")
        embeds, _ = prompt_inputs({k: v[k][[g]] for k in ("prompt_embeds", "prompt_mask")}, torch.float32)
        torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)
        theirs = RecordingQwen()
        pipe_of(likelihood, theirs, unshifted)(prompt=[record["prompt"]], image=sources(likelihood, record),
                                               latents=noisy[[g]], sigmas=[1.0, float(v["sigmas"][g])], height=RES,
                                               width=RES, output_type="latent")
        their = theirs.calls[-1]
        assert their["img_shapes"] == [grids]
        hidden = mine["hidden_states"][[g]]
        torch.testing.assert_close(hidden[:, :256], their["hidden_states"][:, :256], rtol=0, atol=0)
        torch.testing.assert_close(hidden[:, 256:], their["hidden_states"][:, 256:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine["timestep"][[g]], their["timestep"], rtol=0, atol=0)
        length = their["encoder_hidden_states"].shape[1]
        torch.testing.assert_close(mine["encoder_hidden_states"][[g], :length], their["encoder_hidden_states"],
                                   rtol=0, atol=1e-6)


def test_dpo_is_log_2_when_policy_equals_reference(built, pairs):
    cases.dpo_is_log_2_at_policy_equals_reference(built, pairs["records"])
