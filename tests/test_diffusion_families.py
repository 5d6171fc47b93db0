"""Each diffusion family trains end to end and lowers its loss on a fixed batch and draw;
the shipped Pick-a-Pic sample is filtered and oriented as the official recipe does."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import yaml
from PIL import Image

from diffusion_fixtures import save_tiny_pipeline, write_image_pairs
from flow_fixtures import save_tiny_flow_pipeline
from mmalign.config import load_config
from mmalign.data.preference import load_preference_data
from mmalign.modalities import build_modality
from mmalign.train.trainer import PreferenceTrainer, step_seed

SAMPLE = "datasets/pickapic/sample"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def test_shipped_pickapic_sample_is_filtered_and_oriented(capsys):
    records, kind = load_preference_data(SAMPLE, format="pickapic")
    line = capsys.readouterr().out
    # datasets/pickapic/make_sample.py: 40 rows, ties at rows 5, 17, 29, a truncated JPEG at row 23.
    assert "36 pairs kept from 40 rows (3 ties dropped, 0 not different, 0 unlabelled, 1 unreadable)" in line
    assert kind == "pair" and len(records) == 36
    for record in records:
        colour = COLOURS[record["prompt"].split()[1]]
        centre = Image.open(io.BytesIO(record["chosen"])).convert("RGB").getpixel((8, 9))
        # the winner (label 1) draws the caption's colour, wherever it sat in the row
        assert sum(abs(a - b) for a, b in zip(centre, colour)) < 60, (record["source"], centre, colour)


def family_config(tmp_path, modality: str) -> str:
    root = tmp_path / modality
    if modality in ("sd3", "flux"):
        save_tiny_flow_pipeline(root / "pipeline", flux=modality == "flux")
    else:
        save_tiny_pipeline(root / "pipeline", sdxl=modality == "sdxl")
    records = write_image_pairs(root / "pairs", 4)
    (root / "pairs" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flow = modality in ("sd3", "flux")
    beta, lr = (100.0, 3e-3) if flow else (5000.0, 3e-4)  # Flow-DPO's β is 50x smaller: more lr
    cfg = {"modality": modality, "model": {"path": str(root / "pipeline")},
           "data": {"train": str(root / "pairs" / "train.jsonl")},
           "diffusion": {"resolution": 16, "caption_dropout": 0.0},
           "lora": {"enabled": True, "r": 8, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
           "loss": {"name": "dpo", "beta": beta}, "optim": {"lr": lr},
           "train": {"output_dir": str(root / "run"), "max_steps": 12, "batch_size": 4,
                     "progress": False, "tensorboard": False, "log_every": 4}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def loss_and_margin(trainer: PreferenceTrainer, seeds) -> tuple[float, float]:
    """Mean dpo loss and mean reward margin over the 4 training pairs under the given draws."""
    records = trainer.fetch("train", [0, 1, 2, 3])
    trainer.model.eval()
    with torch.no_grad():
        outs = [trainer.forward(records, seed) for seed in seeds]
    trainer.model.train()
    return (sum(float(o[0].mean()) for o in outs) / len(outs),
            sum(float(o[1]["rewards/margins"].mean()) for o in outs) / len(outs))


@pytest.mark.parametrize("modality", ["sd", "sdxl", "sd3", "flux"])
def test_family_trains_end_to_end_and_lowers_the_fixed_batch_loss(tmp_path, modality):
    """The fixed batch is the run's own: its 4 pairs under the draws of its 12 steps, i.e. the
    objective the run descended; its loss must fall and its margin grow. Fresh draws are NOT
    asserted on: at β 5000 the per-draw margin is noise-dominated, its spread grows as the
    policy leaves the reference, and -log σ is convex, so the fresh-draw loss may rise while the
    margin grows, and after 12 (or 30) steps on 4 pairs the mean fresh margin over 32 draws still
    changed sign with train.seed (measured here, sd and sdxl, seeds 0-3: -0.06 .. +0.14)."""
    cfg = load_config(family_config(tmp_path, modality))
    model, likelihood, processor = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, model, likelihood, processor)
    own = [step_seed(cfg.train.seed, step, 0, 0) for step in range(cfg.train.max_steps)]
    before, _ = loss_and_margin(trainer, own)
    assert before == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts as the identity
    metrics = trainer.fit()
    after, own_margin = loss_and_margin(trainer, own)
    assert math.isfinite(metrics["loss"]) and (tmp_path / modality / "run" / "final").is_dir()
    assert after < before - 0.01, (modality, before, after)  # far above float noise (~1e-6)
    assert own_margin > 0, (modality, own_margin)
