"""The common trainer on the diffusion ELBO: every pairwise loss, both reference strategies,
and Diffusion-KTO with its β convention pinned (METHODS.md §1, §2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from diffusion_fixtures import write_image_pairs
from mmalign.config import load_config
from mmalign.losses import LOSSES, get_loss, kto_loss
from mmalign.losses_more import SCOPES
from mmalign.modalities import build_modality
from mmalign.train.trainer import PreferenceTrainer


def write_config(tmp_path, data_file, modality: str = "sdxl", **sections) -> str:
    cfg = {"modality": modality, "model": {"path": "pkg://tiny_sdxl"}, "data": {"train": str(data_file)},
           "diffusion": {"resolution": 16, "random_flip": True},
           "lora": {"enabled": True, "r": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
           "loss": {"name": "dpo", "beta": 5000.0}, "optim": {"lr": 1e-3},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
                     "progress": False, "tensorboard": False, "log_every": 1}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_pairs")
    records = [dict(r, soft_label=0.8) for r in write_image_pairs(root, 8)]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trainable(trainer: PreferenceTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def lora_trainer(tmp_path_factory, pair_file):
    cfg = load_config(write_config(tmp_path_factory.mktemp("run"), pair_file))
    model, likelihood, processor = build_modality(cfg)
    return PreferenceTrainer(cfg, model, likelihood, processor)


@pytest.fixture(scope="module")
def flow_trainer(tmp_path_factory, pair_file):
    from flow_fixtures import save_tiny_flow_pipeline

    root = tmp_path_factory.mktemp("flow")
    pipeline = save_tiny_flow_pipeline(root / "pipeline")
    cfg = load_config(write_config(root, pair_file, modality="sd3", model={"path": str(pipeline)}))
    model, likelihood, processor = build_modality(cfg)
    return PreferenceTrainer(cfg, model, likelihood, processor)


# every pair loss that applies to the ELBO (orpo, cpo, cpo_simpo, cpl are refused there: losses_more.SCOPES)
PAIR_LOSSES = sorted(n for n, s in LOSSES.items() if s.kind == "pair" and "elbo" in SCOPES.get(n, (("elbo",),))[0])


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_every_pairwise_loss_trains_unets_and_flow_transformers(request, family, name):
    trainer = request.getfixturevalue("lora_trainer" if family == "sdxl" else "flow_trainer")
    assert trainer.strategy == "lora_disabled"
    trainer.cfg.loss.name, trainer.loss_spec = name, get_loss(name)
    trainer.cfg.loss.beta = 5000.0 if name in ("dpo", "cdpo", "robust", "soft", "nca_pair", "bco_pair", "apo_zero") else 1.0
    if name in ("cdpo", "robust"):
        trainer.cfg.loss.label_smoothing = 0.1
    before = trainable(trainer)
    values = trainer.train_step()
    assert math.isfinite(values["loss"]) and values["mse/policy"] > 0 and values["mse/ref"] > 0
    after = trainable(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} did not move the adapters"


def test_frozen_reference_full_fine_tune(tmp_path, pair_file):
    cfg = load_config(write_config(tmp_path, pair_file, lora={"enabled": False}))
    model, likelihood, processor = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, model, likelihood, processor)
    assert trainer.strategy == "frozen"
    first = trainer.train_step()
    # step 0: policy == reference (both in eval-free forward of identical weights) -> log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    trainer.train_step()
    ref = trainer.reference.model.state_dict()
    moved = [k for k, v in trainer.unwrapped.state_dict().items() if not torch.equal(v, ref[k])]
    assert moved  # the policy trained, the frozen copy did not follow


def test_diffusion_kto_beta_convention():
    """Diffusion-KTO writes h = mse_ref - mse_θ with β_paper = 1000; our log-ratio under
    logp = -0.5 mse is h/2, so the same loss needs β = 2000 here (z scales the same way)."""
    mse_policy = torch.tensor([0.10, 0.30, 0.22, 0.05])
    mse_ref = torch.tensor([0.12, 0.25, 0.22, 0.06])
    desirable = torch.tensor([True, False, True, False])
    h_paper = mse_ref - mse_policy
    z_paper = h_paper.mean().clamp(min=0)
    paper = torch.where(desirable, 1 - torch.sigmoid(1000 * (h_paper - z_paper)),
                        1 - torch.sigmoid(1000 * (z_paper - h_paper)))
    ours = kto_loss(-0.5 * mse_policy, -0.5 * mse_ref, desirable, beta=2000.0, reference_point=z_paper / 2)
    torch.testing.assert_close(ours, paper)
    # and the written-out value of the first item: z = mean([.02,-.05,0,.01]) < 0 -> 0
    assert float(ours[0]) == pytest.approx(1 - 1 / (1 + math.exp(-1000 * 0.02)), abs=1e-6)


def test_diffusion_kto_trains_on_unpaired_images(tmp_path, pair_file):
    records = [json.loads(line) for line in open(pair_file)]
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in records for k in ("chosen", "rejected")]
    path = pair_file.parent / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    cfg = load_config(write_config(tmp_path, path, loss={"name": "kto", "beta": 2000.0}))
    model, likelihood, processor = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, model, likelihood, processor)
    values = trainer.train_step()
    # LoRA starts as the identity: h = 0 and z = 0 for every item, so the loss is 1 - σ(0).
    assert values["loss"] == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(trainer.train_step()["loss"])


def test_official_dpo_formula_on_a_trainer_batch(lora_trainer):
    """The trainer's dpo value on one batch equals -log σ(-0.5 β [(mse_θw - mse_θl) - (mse_rw - mse_rl)])
    computed from the raw per-image mse of the same draw."""
    trainer = lora_trainer
    trainer.cfg.loss.name, trainer.loss_spec, trainer.cfg.loss.beta = "dpo", get_loss("dpo"), 5000.0
    records = trainer.fetch("train", [0, 1, 2, 3])
    batch = trainer._batch(records)
    with torch.no_grad():
        draw = trainer.likelihood.draw(batch, torch.Generator().manual_seed(7))
        mse_p = trainer.likelihood.logps(trainer.model, batch, draw).diagnostics["mse"]
        mse_r = trainer.reference.logps(batch, draw).diagnostics["mse"]
        losses, _ = trainer.forward(records, seed=7)
    b = len(records)
    inside = -0.5 * 5000.0 * ((mse_p[:b] - mse_p[b:]) - (mse_r[:b] - mse_r[b:]))
    torch.testing.assert_close(losses, -F.logsigmoid(inside), rtol=1e-4, atol=1e-5)
