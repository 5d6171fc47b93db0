"""VLM image terms (mDPO conditional + anchor, Re-Align visual): the pure losses by hand, the
extra forward through the trainer with a tiny LLaVA (policy and reference see the same
corrupted image), and short `mmalign train` runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.losses import IMAGE_TERMS, anchor_loss, image_conditional_loss
from mmalign.types import PairLogps

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "llava_dpo.yaml"
FAST = ["train.progress=false", "train.tensorboard=false", "train.log_every=1", "data.max_length=64", "data.eval="]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from mmalign.toyvlm import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from mmalign.toyvlm import make_shape_pairs

    return make_shape_pairs(8, 0, tmp_path_factory.mktemp("shapes"))


def overrides(llava_dir: Path, data: Path, out: Path, *more: str) -> list[str]:
    return [f"model.path={llava_dir}", f"data.train={data}", f"train.output_dir={out}", *FAST, *more]


# -- the pure losses ------------------------------------------------------------------------
def test_conditional_and_anchor_by_hand():
    # chosen with the true image: policy -10, reference -11 (hc = 1); with the corrupted image:
    # policy -12, reference -11 (h' = -1): d = 2, β = 0.1 -> -log σ(0.2) = 0.598139
    policy, reference = PairLogps(torch.tensor([-10.0]), torch.tensor([-12.0])), PairLogps(
        torch.tensor([-11.0]), torch.tensor([-11.0]))
    assert image_conditional_loss(policy, reference, beta=0.1).item() == pytest.approx(0.598139, abs=1e-6)
    # anchor: -log σ(β hc - δ): hc = 1 -> -log σ(0.1) = 0.644397; δ = 0.5 -> -log σ(-0.4) = 0.913015
    assert anchor_loss(policy, reference, beta=0.1).item() == pytest.approx(0.644397, abs=1e-6)
    assert anchor_loss(policy, reference, beta=0.1, anchor_delta=0.5).item() == pytest.approx(0.913015, abs=1e-6)
    # the anchor reads the true-image (chosen) fields only
    other = PairLogps(torch.tensor([-10.0]), torch.tensor([99.0]))
    assert anchor_loss(other, reference, beta=0.1).item() == pytest.approx(0.644397, abs=1e-6)
    # policy == reference: both terms are log 2, and the conditional term still has a gradient
    same = PairLogps(torch.tensor([-3.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True))
    ref = PairLogps(torch.tensor([-3.0]), torch.tensor([-5.0]))
    loss = image_conditional_loss(same, ref, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    loss.backward()
    assert same.chosen.grad.item() == pytest.approx(-0.05) and same.rejected.grad.item() == pytest.approx(0.05)
    assert set(IMAGE_TERMS) == {"mdpo", "realign"}
    assert set(IMAGE_TERMS["mdpo"].terms) == {"conditional", "anchor"} and IMAGE_TERMS["mdpo"].image == "corrupt"


# -- through the trainer ----------------------------------------------------------------------
def make_trainer(llava_dir, shapes, tmp_path, *more):
    from mmalign.modalities import build_modality
    from mmalign.train.trainer import PreferenceTrainer

    cfg = load_config(TINY_CONFIG, overrides(llava_dir, shapes, tmp_path / "run", *more))
    return PreferenceTrainer(cfg, *build_modality(cfg))


def spy_pixels(trainer, monkeypatch) -> list[torch.Tensor]:
    """pixel_values of every likelihood.logps call (LoRA: policy and reference both go through it)."""
    seen, original = [], trainer.likelihood.logps

    def logps(model, batch, draw=None):
        seen.append(batch.inputs["pixel_values"].clone())
        return original(model, batch, draw)

    monkeypatch.setattr(trainer.likelihood, "logps", logps)
    return seen


def test_policy_and_reference_score_the_same_corrupted_image(llava_dir, shapes, tmp_path, monkeypatch):
    trainer = make_trainer(llava_dir, shapes, tmp_path, "loss.image_term=mdpo", "loss.corruption=noise")
    seen = spy_pixels(trainer, monkeypatch)
    records = trainer.fetch("train", [0, 1, 2])
    losses, metrics = trainer.forward(records, seed=5)
    # calls: main policy, main reference (adapters off), corrupted policy, corrupted reference
    assert len(seen) == 4 and seen[2].shape == (3, 3, 32, 32)
    assert torch.equal(seen[2], seen[3])  # the same corrupted images for policy and reference
    assert not torch.allclose(seen[2], seen[0][:3])  # ... which are not the clean ones
    # LoRA B starts at 0: policy == reference, so both terms are exactly log 2 per example
    torch.testing.assert_close(metrics["mdpo/conditional"], torch.full((3,), math.log(2)))
    torch.testing.assert_close(metrics["mdpo/anchor"], torch.full((3,), math.log(2)))
    # the same answer scores differently with the corrupted image
    main_chosen = metrics["logps/chosen"]
    assert (metrics["mdpo/logps_modified"] - main_chosen).abs().min() > 1e-3
    # total = main loss + weight x (conditional + anchor)
    torch.testing.assert_close(losses.detach(), metrics["loss"])
    trainer.forward(records, seed=5)
    trainer.forward(records, seed=6)
    assert torch.equal(seen[6], seen[2]) and not torch.equal(seen[10], seen[2])  # a pure function of the seed


def test_total_adds_the_weighted_terms(llava_dir, shapes, tmp_path):
    trainer = make_trainer(llava_dir, shapes, tmp_path, "loss.image_term=mdpo", "loss.image_term_weight=0.5",
                           "loss.sft_weight=0")
    records = trainer.fetch("train", [3, 4])
    with torch.no_grad():
        losses, metrics = trainer.forward(records, seed=1)
    # policy == reference: dpo log 2 + 0.5 x (log 2 + log 2) = 2 log 2
    torch.testing.assert_close(losses, torch.full((2,), 2 * math.log(2)))


def test_realign_uses_another_examples_image(llava_dir, shapes, tmp_path):
    trainer = make_trainer(llava_dir, shapes, tmp_path, "loss.image_term=realign")
    records = trainer.fetch("train", [0, 1, 2, 3])
    modified = trainer.image_terms.modified_records(records, seed=9)
    for r, m in zip(records, modified):
        assert m["images"] != r["images"] and m["completion"] == r["chosen"] and m["prompt"] == r["prompt"]
        assert m["images"][0] in [x["images"][0] for x in trainer.records]  # a training image, by value
    assert modified == trainer.image_terms.modified_records(records, seed=9)
    with torch.no_grad():
        _, metrics = trainer.forward(records, seed=9)
    torch.testing.assert_close(metrics["realign/visual"], torch.full((4,), math.log(2)))


def test_mdpo_trains_through_the_cli(llava_dir, shapes, tmp_path):
    from mmalign.cli import main

    out = tmp_path / "run"
    assert main(["train", str(TINY_CONFIG), *overrides(llava_dir, shapes, out, "loss.image_term=mdpo",
                                                      "train.max_steps=3", "train.batch_size=4",
                                                      "optim.lr=0.01")]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 3
    assert rows[0]["mdpo/conditional"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["mdpo/anchor"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["mdpo/conditional"] != rows[0]["mdpo/conditional"]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_precomputed_reference_and_bad_options_are_refused(llava_dir, shapes, tmp_path, capsys):
    from mmalign.cli import main

    args = ["train", str(TINY_CONFIG), *overrides(llava_dir, shapes, tmp_path / "run", "loss.image_term=mdpo",
                                                  "lora.enabled=false", "reference.strategy=precomputed")]
    assert main(args) == 2
    assert "a precomputed reference cannot" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="loss.corruption: 'blur' is not one of crop, noise, mask"):
        load_config(TINY_CONFIG, overrides(llava_dir, shapes, tmp_path, "loss.corruption=blur"))
    with pytest.raises(ConfigError, match="corruption_crop_scale must be"):
        load_config(TINY_CONFIG, overrides(llava_dir, shapes, tmp_path, "loss.image_term=mdpo",
                                           "loss.corruption_crop_scale=[0.5, 0.1]"))


def test_corruption_is_deterministic_per_example(llava_dir, shapes, tmp_path):
    trainer = make_trainer(llava_dir, shapes, tmp_path, "loss.image_term=mdpo")  # crop, mDPO's default
    records = trainer.fetch("train", [0, 5])
    a = trainer.image_terms.modified_records(records, seed=3)
    b = trainer.image_terms.modified_records(records[::-1], seed=3)  # order in the batch does not matter
    assert np.array_equal(np.asarray(a[0]["images"][0]), np.asarray(b[1]["images"][0]))
    assert a[0]["images"][0].size == (32, 32)
