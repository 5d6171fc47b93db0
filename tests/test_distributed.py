"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the
same global batch: data sharding, gradient averaging, gradient accumulation and the
all-reduced batch statistic of bco_pair all line up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
import torch
from conftest import needs_torchrun, torchrun
from safetensors.torch import load_file

from mmalign.cli import main

ROOT = Path(__file__).resolve().parents[1]


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


TRAIN = {"max_steps": 2, "batch_size": 4, "progress": False, "tensorboard": False, "log_every": 1}
ATTENTION_LORA = {"enabled": True, "r": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def _write(tmp_path, cfg: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def modality_config(tmp_path, modality: str) -> str:
    """A tiny config per modality family: LoRA, SGD, 2 steps of 4 pairs."""
    if modality == "llava":
        from mmalign.toyvlm import make_shape_pairs, save_tiny_llava

        save_tiny_llava(tmp_path / "llava")
        data = make_shape_pairs(8, 0, tmp_path / "shapes")
        return _write(tmp_path, {"modality": "llava", "model": {"path": str(tmp_path / "llava")},
                                 "data": {"train": str(data), "max_length": 64},
                                 "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                 "loss": {"name": "dpo", "beta": 0.1}, "optim": {"name": "sgd", "lr": 0.5},
                                 "train": dict(TRAIN, output_dir=str(tmp_path / "run"))})
    if modality in ("tango", "audioldm2"):
        return _write(tmp_path, audio_config(tmp_path, modality))
    if modality == "sdxl_spo":
        return _write(tmp_path, spo_config(tmp_path))
    if modality == "sd3_grpo":
        return _write(tmp_path, grpo_config(tmp_path))
    if modality in ("wan", "wan22"):
        return _write(tmp_path, wan_config(tmp_path, two_experts=modality == "wan22"))
    if modality == "qwen_image":
        return _write(tmp_path, qwen_image_config(tmp_path))
    from test_diffusion_families import family_config

    path = family_config(tmp_path, modality)  # dpo on 4 image pairs, LoRA, 12 steps of 4
    cfg = yaml.safe_load(open(path))
    cfg["optim"] = {"name": "sgd", "lr": 0.05 if modality == "sd3" else 1.0}
    cfg["train"].update({"max_steps": 2, "log_every": 1})
    cfg["diffusion"].update({"random_flip": True, "caption_dropout": 0.5})  # every draw kind in play
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def audio_config(tmp_path, modality: str) -> dict:
    """Audio Diffusion-DPO (Tango 2's β) on 4 tone pairs. The 4 prompts tokenize to 4 lengths, so
    each process pads its half of the batch to another length than the single process pads the
    whole (the text mask must make that invisible); caption dropout 0.5 puts the dropped caption
    in play (audio refuses random flips)."""
    from audio_fixtures import save_tiny_audioldm2, save_tiny_tango, write_audio_pairs

    (save_tiny_tango if modality == "tango" else save_tiny_audioldm2)(tmp_path / "pipeline")
    data, _ = write_audio_pairs(tmp_path / "pairs", 4)
    return {"modality": modality, "model": {"path": str(tmp_path / "pipeline")},
            "data": {"train": str(data), "format": "audio_pairs"}, "audio": {"seconds": 0.32},
            "diffusion": {"caption_dropout": 0.5}, "lora": ATTENTION_LORA,
            "loss": {"name": "dpo", "beta": 2000.0}, "optim": {"name": "sgd", "lr": 1.0},
            "train": dict(TRAIN, output_dir=str(tmp_path / "run"))}


def wan_config(tmp_path, two_experts: bool = False) -> dict:
    """configs/tiny/wan_dpo.yaml (video Flow-DPO, LoRA on attention and FFN) on the shipped 4 video
    pairs (3 mp4 files and a frame folder among them), flips and caption dropout in play; two_experts:
    a Wan 2.2 A14B-shaped folder (boundary_ratio 0.75: each process's rows reach one or both experts)."""
    from wan_fixtures import copy_video_sample, save_tiny_wan22_pipeline, save_tiny_wan_pipeline

    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / "wan_dpo.yaml"))
    save = (lambda path: save_tiny_wan22_pipeline(path, boundary_ratio=0.75)) if two_experts else save_tiny_wan_pipeline
    cfg["model"]["path"] = str(save(tmp_path / "pipeline"))
    cfg["data"]["train"] = str(copy_video_sample(tmp_path / "pairs"))
    cfg["diffusion"].update({"random_flip": True, "caption_dropout": 0.5})
    cfg["optim"] = {"name": "sgd", "lr": 1.0}
    cfg["train"] = dict(TRAIN, output_dir=str(tmp_path / "run"))
    return cfg


def qwen_image_config(tmp_path) -> dict:
    """configs/tiny/qwen_image_flow_dpo.yaml (a current image family: Qwen2.5-VL prompts of uneven
    lengths, packed latents, dynamic shift) on 4 tiny pairs, flips and caption dropout in play."""
    from qwen_image_fixtures import write_tiny_qwen_image_run

    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / "qwen_image_flow_dpo.yaml"))
    cfg["data"]["train"] = str(write_tiny_qwen_image_run(tmp_path / "fixture", count=4))
    cfg["model"]["path"] = str(tmp_path / "fixture" / "pipeline")
    cfg["diffusion"].update({"random_flip": True, "caption_dropout": 0.5})
    cfg["optim"] = {"name": "sgd", "lr": 1.0}
    cfg["train"] = dict(TRAIN, output_dir=str(tmp_path / "run"))
    return cfg


def spo_config(tmp_path) -> dict:
    """configs/tiny/spo.yaml made shorter (6 sampler steps, 4 prompts a round) with a new round at
    EVERY step: round 1 is sampled by the weights after step 1, which the processes must agree on."""
    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / "spo.yaml"))
    cfg["spo"].update({"num_steps": 6, "prompts_per_round": 4, "round_steps": 1})
    cfg["optim"] = {"name": "sgd", "lr": 1.0}
    cfg["train"] = dict(TRAIN, output_dir=str(tmp_path / "run"))
    return cfg


def grpo_config(tmp_path) -> dict:
    """configs/tiny/flow_grpo.yaml on a tiny SD3 pipeline made shorter (2 prompts x 2 trajectories x
    2 trained steps = 8 transitions a round) with a new round at EVERY step."""
    from flow_fixtures import save_tiny_flow_pipeline

    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / "flow_grpo.yaml"))
    cfg["model"]["path"] = str(save_tiny_flow_pipeline(tmp_path / "pipeline"))
    cfg["grpo"].update({"prompts_per_round": 2, "group_size": 2, "num_steps": 3, "round_steps": 1})
    cfg["optim"] = {"name": "sgd", "lr": 1.0}
    cfg["train"] = dict(TRAIN, output_dir=str(tmp_path / "run"))
    return cfg


def assert_same_grpo_rounds(one: Path, two: Path) -> None:
    """GRPO: as SPO (`assert_same_rounds`), every process samples the whole round; the saved
    transitions, log-probs and advantages agree up to kernel rounding."""
    names = sorted(p.name for p in (one / "rounds").glob("grpo_*.safetensors"))
    assert names == ["grpo_00000.safetensors", "grpo_00001.safetensors"]
    for name in names:
        a, b = load_file(str(one / "rounds" / name)), load_file(str(two / "rounds" / name))
        assert a.keys() == b.keys() and a["x_t"].shape[0] == 8
        for key in a:
            diff = float((b[key].double() - a[key].double()).abs().max())
            assert diff <= 1e-3, f"{name} {key}: max |two - one| = {diff:.3g}"


def assert_same_rounds(one: Path, two: Path) -> None:
    """SPO trains on pairs its policy samples online. Every process samples the WHOLE round (same
    seed, same weights) and takes its share of it, so both runs' rounds hold the same transitions
    up to kernel rounding (measured, values of size ~3: round 0 exactly equal when every process
    runs 1 thread, 1.1e-5 apart when the single process runs 2 threads and the torchrun workers 1,
    as under `make test`; round 1, sampled by weights that differ by rounding, 1.2e-5); another
    seed would differ by O(1). Only the main process writes rounds: rank 1's copy is checked by
    the weights (half of each batch is its)."""
    from safetensors import safe_open

    names = sorted(p.name for p in (one / "rounds").glob("round_*.safetensors"))
    assert names == ["round_00000.safetensors", "round_00001.safetensors"]
    for name in names:
        a, b = load_file(str(one / "rounds" / name)), load_file(str(two / "rounds" / name))
        assert a.keys() == b.keys() and a["x_t"].shape[0] > 0
        for key in a:
            diff = float((b[key].double() - a[key].double()).abs().max())
            assert diff <= 1e-3, f"{name} {key}: max |two - one| = {diff:.3g}"
        with safe_open(str(one / "rounds" / name), "pt") as fa, safe_open(str(two / "rounds" / name), "pt") as fb:
            assert fa.metadata()["prompt"] == fb.metadata()["prompt"]


@needs_torchrun
@pytest.mark.parametrize("modality", ["sdxl", "sd3", "llava", "tango", "audioldm2", "sdxl_spo", "sd3_grpo",
                                      "wan", "wan22", "qwen_image"])
def test_every_modality_trains_the_same_in_two_processes(tmp_path, modality):
    """Each modality's tiny config: 2 processes x batch 2 == 1 process x batch 4. For the
    diffusion families (images and audio) this holds because every draw (t or σ, ε, flip, dropped
    caption, latent sample) is a function of (step, example row), not of the process that scores
    the pair; for SPO because every process samples the same round (`assert_same_rounds`)."""
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
    # ~2e-4 of the weights' size after 2 steps (measured; tango 1.4e-6, audioldm2 1.2e-5, SPO
    # 4.2e-6); a draw that depended on the process would give different t and ε and differences
    # of the weights' own size (measured with rank 1's draw seed shifted: tango 1.2x, audioldm2
    # 1.3x; rank 1 sampling its SPO rounds from another seed: 0.8x).
    assert max(diffs.values()) <= 1e-3 * scale, (scale, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
    if modality == "sdxl_spo":
        assert_same_rounds(one, two)
    if modality == "sd3_grpo":
        assert_same_grpo_rounds(one, two)
    rows_a = [json.loads(x) for x in open(one / "metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(two / "metrics.jsonl")]
    # Diffusion: policy and reference forwards of the same weights differ by ~1e-8 in mse when
    # the kernels see another batch size; β = 5000 turns that into ~1e-4 in the loss.
    tol = 1e-5 if modality == "llava" else 1e-3
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=tol)
