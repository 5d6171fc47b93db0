"""The realistic benchmark rows of issue 20 at their smallest size: both sides of each row see the
same tokens / draws and give the same losses (the rows' ratios are only meaningful then).

benchmarks/text_real.py (mmalign, padding-free mmalign, TRL with its memory options), vlm_real.py
(mmalign vs TRL in VLM mode), pipelines_real.py (SD1.5 recipe loop vs mmalign on the cache; FLUX
uncached vs cached), text_memory.py (static sizes). Sides run in this process (the benchmarks run
each in a fresh interpreter only to measure its memory)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import pipelines_real, text_memory, text_real, vlm_dpo, vlm_real


def test_text_real_sides_agree_with_trl_and_its_memory_options(tmp_path: Path):
    s = text_real.Settings(steps=2, warmup=1, batch_size=2, hidden_size=32, num_layers=1, num_pairs=8,
                           max_length=96, vocab=600)
    stats = text_real.prepare(tmp_path, s)
    assert stats["sequence_tokens_max"] <= s.max_length
    runs = {name: text_real.SIDES[name](tmp_path, s) for name in ("mmalign", "mmalign_packed", "trl", "trl_gc")}
    assert runs["trl"]["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    for name in ("mmalign", "mmalign_packed", "trl_gc"):
        assert runs[name]["losses"] == pytest.approx(runs["trl"]["losses"], abs=1e-4), name
    assert runs["trl"]["losses"][1] != pytest.approx(math.log(2), abs=1e-4)  # the step moved the policy


def test_text_memory_profile_counts_weights_gradients_and_adam_moments(tmp_path: Path):
    s = text_real.Settings(steps=1, warmup=0, batch_size=2, hidden_size=32, num_layers=1, num_pairs=4,
                           max_length=64, vocab=300)
    text_real.prepare(tmp_path, s)
    out = text_memory.profile_side(tmp_path, s, chunk=16)["extra"]
    n = 2 * 300 * 32 + 4 * 32 * 32 + 3 * 32 * 128 + 3 * 32  # untied embedding + head, attention, MLP, 3 norms
    mib = 4 * n / 2**20
    assert out["static_mib"] == pytest.approx({"policy_weights": mib, "reference_weights": mib, "gradients": mib,
                                               "optimizer_state": 2 * mib}, rel=0.02)
    assert set(out["phases"]) == set(text_memory.PHASES)


def test_vlm_real_tokens_identical_and_losses_agree(tmp_path: Path):
    s = vlm_real.Settings(steps=2, warmup=1, num_pairs=4, vocab=300, image_size=56, patch_size=14)
    check = vlm_real.prepare(tmp_path, s)
    assert check["identical"] and check["image_tokens_per_image"] == 16
    mm, trl = vlm_dpo.run_mmalign(tmp_path, s), vlm_dpo.run_trl(tmp_path, s)
    assert mm["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert mm["losses"] == pytest.approx(trl["losses"], abs=1e-4)


def test_pipelines_real_sides_agree_and_the_cache_drops_the_encoders(tmp_path: Path):
    s = pipelines_real.Settings(tiny=True, steps=2, warmup=1, num_pairs=2, lora_rank=4, rows="sd15,sdxl,flux")
    caches = pipelines_real.prepare(tmp_path, s)
    assert set(caches) == {"sd15", "sdxl", "flux"}
    runs = {name: side(tmp_path, s) for name, side in pipelines_real.SIDES.items()}
    for row, (old, new) in pipelines_real.ROWS.items():
        a, b = runs[f"{row}_{old}"], runs[f"{row}_{new}"]
        assert a["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
        assert a["losses"] == pytest.approx(b["losses"], abs=s.loss_tol)
        assert a["losses"][1] != pytest.approx(math.log(2), abs=1e-6)  # LoRA moved: the later loss is compared too
        assert a["extra"]["loaded_text_encoders"] and not b["extra"]["loaded_text_encoders"]
        assert b["extra"]["ms_per_step"]["text_encoders"] == 0 and b["extra"]["ms_per_step"]["vae"] == 0
    for row in ("sd15", "sdxl"):
        assert runs[f"{row}_mmalign"]["extra"]["reference"] == "lora_disabled"
        assert not runs[f"{row}_mmalign"]["extra"]["gradient_checkpointing"]
    assert runs["sdxl_recipe"]["extra"]["reference"] == "frozen copy (bfloat16)"
    for side in ("recipe", "mmalign"):  # bf16 base weights, fp32 LoRA on both sdxl sides
        assert runs[f"sdxl_{side}"]["extra"]["param_dtypes"] == {"trainable": ["float32"], "frozen": ["bfloat16"]}
