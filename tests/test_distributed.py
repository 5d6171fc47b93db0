"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the
same global batch: data sharding, gradient averaging, gradient accumulation and the
all-reduced batch statistic of bco_pair all line up."""

from __future__ import annotations

import json

import pytest
import yaml
import torch
from conftest import needs_torchrun, torchrun
from safetensors.torch import load_file

from mmalign.cli import main


@needs_torchrun
def test_two_processes_equal_one(make_config, tmp_path):
    # SGD: Adam's first steps are ~lr * sign(g), which turns rounding noise in near-zero
    # gradients into lr-sized differences; SGD keeps the comparison tight.
    cfg = make_config(loss={"name": "bco_pair"}, optim={"name": "sgd", "lr": 0.5},
                      train={"max_steps": 3, "grad_accum": 2, "batch_size": 4})
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(cfg), f"train.output_dir={one}"]) == 0
    run = torchrun(["train", str(cfg), f"train.output_dir={two}", "train.batch_size=2"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es) x batch 2 x accum 2" in run.stdout
    a = load_file(str(one / "checkpoints" / "step_00000003" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # Both runs logged the same (all-reduced) metrics at every step, and training moved.
    rows_a = [json.loads(x) for x in open(one / "metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(two / "metrics.jsonl")]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb["rewards/margins"] == pytest.approx(ra["rewards/margins"], abs=1e-6)
    assert rows_a[-1]["rewards/margins"] != 0.0
    # A checkpoint written by 2 processes x batch 2 resumes in 1 process x batch 4 (the same
    # world micro-batch, which bco_pair's per-micro-step statistic needs) and continues
    # exactly like the 1-process run.
    for out in (one, two):
        assert main(["train", str(cfg), f"train.output_dir={out}", "train.resume=true", "train.max_steps=4"]) == 0
    a = load_file(str(one / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_00000004" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)



def modality_config(tmp_path, modality: str) -> str:
    """A tiny config per modality family: LoRA, SGD, 2 steps of 4 pairs."""
    if modality == "llava":
        from mmalign.toyvlm import make_shape_pairs, save_tiny_llava

        save_tiny_llava(tmp_path / "llava")
        data = make_shape_pairs(8, 0, tmp_path / "shapes")
        cfg = {"modality": "llava", "model": {"path": str(tmp_path / "llava")},
               "data": {"train": str(data), "max_length": 64},
               "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]},
               "loss": {"name": "dpo", "beta": 0.1}, "optim": {"name": "sgd", "lr": 0.5},
               "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
                         "progress": False, "tensorboard": False, "log_every": 1}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)
    from test_diffusion_families import family_config

    path = family_config(tmp_path, modality)  # dpo on 4 image pairs, LoRA, 12 steps of 4
    cfg = yaml.safe_load(open(path))
    cfg["optim"] = {"name": "sgd", "lr": 0.05 if modality == "sd3" else 1.0}
    cfg["train"].update({"max_steps": 2, "log_every": 1})
    cfg["diffusion"].update({"random_flip": True, "caption_dropout": 0.5})  # every draw kind in play
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@needs_torchrun
@pytest.mark.parametrize("modality", ["sdxl", "sd3", "llava"])
def test_every_modality_trains_the_same_in_two_processes(tmp_path, modality):
    """Each modality's tiny config: 2 processes x batch 2 == 1 process x batch 4. For the
    diffusion families this holds because every draw (t or σ, ε, flip, dropped caption, latent
    sample) is a function of (step, example row), not of the process that scores the pair."""
    cfg = modality_config(tmp_path, modality)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", cfg, f"train.output_dir={one}"]) == 0
    run = torchrun(["train", cfg, f"train.output_dir={two}", "train.batch_size=2"])
    assert run.returncode == 0, run.stderr[-3000:]
    a = load_file(str(one / "checkpoints" / "step_00000002" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    moved = [name for name in a if "lora_B" in name and a[name].abs().max() > 0]
    assert moved, "training did not move the LoRA weights: the comparison would be vacuous"
    diffs = {name: float((b[name] - a[name]).abs().max()) for name in a}
    scale = max(float(a[name].abs().max()) for name in moved)
    # Float rounding only (gradients are summed in another order), which β = 5000 amplifies to
    # ~2e-4 of the weights' size after 2 steps (measured); a draw that depended on the process
    # would give different t and ε and differences of the weights' own size.
    assert max(diffs.values()) <= 1e-3 * scale, (scale, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
    rows_a = [json.loads(x) for x in open(one / "metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(two / "metrics.jsonl")]
    # Diffusion: policy and reference forwards of the same weights differ by ~1e-8 in mse when
    # the kernels see another batch size; β = 5000 turns that into ~1e-4 in the loss.
    tol = 1e-5 if modality == "llava" else 1e-3
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=tol)
