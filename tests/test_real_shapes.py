"""Real shapes without weights (issue 17 item 5; benchmarks/real_shapes.py): the published configs
of configs/<family>/ agree with each other (text width, RoPE axes), and each family's published
transformer at reduced depth, with a text encoder of the published width and random bf16 weights,
runs one LoRA Flow-DPO step and a sampling step on CPU through the family's own build, in its own
process, at the smallest size (2 latent tokens per side, 32 text tokens), under 6 GB."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import real_shape_parts as parts
from benchmarks.real_shapes import MAX_RSS_GB, run_all

ROOT = Path(__file__).resolve().parents[1]


def config(name: str) -> dict:
    return json.loads((ROOT / "configs" / name).read_text())


def test_every_published_config_names_its_source():
    files = sorted(ROOT.glob("configs/*/*.json"))
    assert len(files) >= 13
    for path in files:
        assert len(json.loads(path.read_text()).get("_source", "")) > 40, path


def test_the_published_text_widths_and_rope_axes_agree():
    """Text width = what the transformer reads; RoPE axes fill a head (hand-known values)."""
    klein, dev = config("flux2/transformer_klein_4b.json"), config("flux2/transformer_dev.json")
    assert klein["joint_attention_dim"] == 3 * config("flux2/text_encoder_klein_4b.json")["hidden_size"] == 7680
    mistral = config("flux2/text_encoder_dev.json")["text_config"]
    assert dev["joint_attention_dim"] == 3 * mistral["hidden_size"] == 15360
    qwen = config("qwen_image/transformer.json")
    assert qwen["joint_attention_dim"] == config("qwen_image/text_encoder.json")["text_config"]["hidden_size"] == 3584
    zimage = config("zimage/transformer.json")
    assert zimage["cap_feat_dim"] == config("zimage/text_encoder.json")["hidden_size"] == 2560
    for wan in ("wan/transformer_t2v_1_3b.json", "wan/transformer_ti2v_5b.json"):
        assert config(wan)["text_dim"] == config("wan/text_encoder.json")["d_model"] == 4096
    assert config("wan/transformer_ti2v_5b.json")["in_channels"] == config("wan/vae_ti2v_5b.json")["z_dim"] == 48
    for c in (klein, dev, qwen):
        assert sum(c["axes_dims_rope"]) == c["attention_head_dim"] == 128
    assert sum(zimage["axes_dims"]) == zimage["dim"] // zimage["n_heads"] == 128
    assert klein["in_channels"] == dev["in_channels"] == 4 * 32  # the 32 VAE channels patchified 2x2


TEXT_WIDTH = {"flux2_klein_4b": 7680, "flux2_dev": 15360, "qwen_image": 3584, "zimage": 2560,
              "wan2_1_t2v_1_3b": 4096, "wan2_2_ti2v_5b": 4096}


def published_params(shape: parts.Shape) -> int:
    """Parameters of the published transformer at the shape's reduced depth (built on meta)."""
    import diffusers

    cls = getattr(diffusers, config(shape.transformer)["_class_name"])
    with torch.device("meta"):
        model = cls.from_config({**parts.published(shape.transformer), **shape.depth})
    return sum(p.numel() for p in model.parameters())


# FLUX.2 [dev]'s transformer keeps 1.8 B parameters even at one block (3.6 GB written in bf16, 5.5 GB peak):
# `make bench` runs it (`python -m benchmarks.real_shapes`); the suite keeps the five that fit a CI disk and budget.
IN_SUITE = [name for name in parts.SHAPES if name != "flux2_dev"]


@pytest.mark.parametrize("name", IN_SUITE)
def test_published_shapes_run_a_lora_dpo_step_and_sample(name, tmp_path):
    shape = parts.SHAPES[name]
    row = run_all([name], tokens=2, text_length=32, work=tmp_path, threads=1)[0]
    assert row["text_width"] == {"encoder_hidden_states" if shape.video else "prompt_embeds": TEXT_WIDTH[name]}
    assert row["transformer_params"] - row["trained_params"] == published_params(shape)
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert math.isfinite(row["loss_after"]) and abs(row["loss_after"] - row["loss"]) > 1e-4 and row["grad_norm"] > 0
    side = 2 * shape.unit
    expected = [1, 5, side, 2 * side, 3] if shape.video else [1, 3, side, side]  # videos: non-square
    assert row["resolution"] == side and row["sample_shape"] == expected
    assert row["peak_rss_gb"] < MAX_RSS_GB and row["write_peak_rss_gb"] < MAX_RSS_GB
