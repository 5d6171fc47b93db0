"""Sharded training (`train.fsdp: true`, torch FSDP2 `fully_shard`) verified on CPU: 2 torchrun
processes over gloo, each holding half of every parameter of the wrapped blocks, train to the
weights of 1 unsharded process with the same global batch; a sharded run's checkpoints resume
exactly and export full weights."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import needs_torchrun, torchrun
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.train import sharded_checkpoint, sharding

# AdamW with a large eps: updates ≈ lr·m/eps, smooth in the gradient (plain Adam's first steps are
# ≈ lr·sign(g), which turns rounding noise in near-zero gradients into lr-sized differences); its
# moments make the optimizer state something a resume must restore.
ADAMW = {"name": "adamw", "lr": 1e-2, "eps": 1e-2}


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The trainable weights of checkpoint `step`: its model.safetensors, or its shards put together."""
    folder = run / "checkpoints" / f"step_{step:08d}"
    if sharded_checkpoint.is_sharded_checkpoint(folder):
        return sharded_checkpoint.consolidate(folder / "model_shards")
    return load_file(str(folder / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                rel: float) -> None:
    """Same keys and shapes; |b - a| <= rel x the largest move of training (which must be real)."""
    assert a.keys() == b.keys() and a
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4, "training did not move the weights: the comparison would be vacuous"
    worst = max(((float((b[k] - a[k]).abs().max()), k) for k in a), key=lambda x: x[0])
    assert worst[0] <= rel * moved, (worst, moved)


@pytest.fixture(scope="module")
def text_run(tiny_lm_dir, toy_data, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run folder): full fine-tuning of the tiny LM (frozen reference, sharded like the
    policy), 3 steps of 2 micro-steps by 2 sharded processes (batch 2 each), full-state checkpoints
    at every step. Shared by the text tests, which copy the folder before writing into it."""
    root = tmp_path_factory.mktemp("fsdp_text")
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_lm_dir)}, "data": {"train": str(toy_data["train"]), "max_length": 48},
        "loss": {"name": "dpo", "beta": 0.1}, "optim": ADAMW,
        "train": {"output_dir": str(root / "run"), "max_steps": 3, "grad_accum": 2, "batch_size": 4, "save_every": 1,
                  "keep_last": 4, "log_every": 1, "progress": False, "tensorboard": False}}))
    run = torchrun(["train", str(cfg), f"train.output_dir={root / 'two'}", "train.batch_size=2", "train.fsdp=true"])
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    assert "sharded over 2 processes" in run.stdout  # policy and frozen reference
    return cfg, root / "two"


@needs_torchrun
def test_text_lm_two_sharded_processes_equal_one_and_resume(text_run, tmp_path):
    cfg, made = text_run
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(made, two)
    assert main(["train", str(cfg), f"train.output_dir={one}", "train.max_steps=4"]) == 0
    start = weights(one, 1)  # after 1 step: the moves of steps 2-4 are compared
    for step in (2, 3):
        assert_same(weights(one, step), weights(two, step), start, 1e-3)
    # the sharded checkpoint of step 3 resumes (2 sharded processes) and continues like the
    # uninterrupted run: weights and the AdamW moments come back
    run = torchrun(["train", str(cfg), f"train.output_dir={two}", "train.batch_size=2", "train.fsdp=true",
                    "train.resume=true", "train.max_steps=4"])
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    assert "resumed from" in run.stdout
    assert_same(weights(one, 4), weights(two, 4), start, 1e-3)
    rows_a = [json.loads(x) for x in open(one / "metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(two / "metrics.jsonl")]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
    # final/ of the sharded run holds full (gathered) weights equal to the unsharded run's
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    assert_same(a, b, {k: v for k, v in AutoModelForCausalLM.from_pretrained(cfg_model(cfg)).state_dict().items()},
                1e-3)
    # `mmalign export` of the sharded run's checkpoint gives the full model
    assert main(["export", str(two), "--to", str(tmp_path / "exported"), "--source", "latest"]) == 0
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    for k in a:
        assert c[k].shape == a[k].shape
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=0, msg=k)


SHARD_FILES = ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]


def torchrun_script(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 tests/SCRIPT ARGS` on a free port, one thread per process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=port)
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "--master_port", port,
           str(Path(__file__).with_name(script)), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def optimizer_moments(step_dir: Path) -> dict[str, torch.Tensor]:
    """`<parameter>.<key>` -> full tensor of the AdamW state of a checkpoint, full or sharded."""
    if sharded_checkpoint.is_sharded_checkpoint(step_dir):
        return sharded_checkpoint.consolidate(step_dir / "optimizer_shards")
    state = torch.load(step_dir / "trainer.pt", weights_only=True)["optimizer"]["state"]
    return {f"{name}.{key}": v for name, entry in state.items() for key, v in entry.items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def assert_each_file_holds_its_slices(folder: Path, full: dict[str, torch.Tensor]) -> None:
    """Two files (one per process); every tensor of >= 2 rows split between them, none whole in
    either; together exactly the full tensors' elements."""
    from safetensors import safe_open

    assert sorted(p.name for p in folder.iterdir()) == SHARD_FILES
    held = dict.fromkeys(full, 0)
    for name in SHARD_FILES:
        with safe_open(str(folder / name), framework="pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                held[k] += int(torch.Size(shape).numel())
                if full[k].dim() and full[k].shape[0] >= 2:
                    assert shape[0] < full[k].shape[0], (name, k, shape)
    assert held == {k: v.numel() for k, v in full.items()}


@needs_torchrun
def test_text_lm_sharded_checkpoints_save_resume_export(text_run, tmp_path, capsys):
    """train.fsdp_checkpoint: sharded. Each process writes its own slices of the weights and the
    AdamW moments; a process killed while saving step 3 leaves step 2 the latest, from which 2
    sharded processes (and 1 unsharded process) resume to the uninterrupted full-state run's
    weights and moments (a damaged shard file: the checkpoint before); `mmalign export` of the
    sharded checkpoint gives the full-state export."""
    cfg, full = text_run  # the uninterrupted run, full-state checkpoints: read only
    shard, one = tmp_path / "sharded", tmp_path / "one"
    common = ["train.batch_size=2", "train.fsdp=true"]
    args = ["train", str(cfg), f"train.output_dir={shard}", *common, "train.fsdp_checkpoint=sharded"]
    run = torchrun_script("fsdp_kill.py", ["3", *args])
    assert run.returncode != 0  # process 1 died mid-save
    root = shard / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002" and not (root / "step_00000003").exists()
    left = root / ".step_00000003.tmp"  # the killed save: model shards written, then nothing
    assert sorted(p.name for p in (left / "model_shards").iterdir()) == SHARD_FILES
    assert not (left / "trainer.pt").exists() and not any((left / "optimizer_shards").iterdir())
    step2 = root / "step_00000002"
    assert not (step2 / "model.safetensors").exists()
    moments = optimizer_moments(full / "checkpoints" / "step_00000002")
    assert_each_file_holds_its_slices(step2 / "model_shards", weights(full, 2))
    assert_each_file_holds_its_slices(step2 / "optimizer_shards", moments)
    assert_identical(weights(full, 2), sharded_checkpoint.consolidate(step2 / "model_shards"))
    assert_identical(moments, optimizer_moments(step2))
    # 1 unsharded process resumes the 2-process sharded checkpoints (read whole): step 2's
    # optimizer shard damaged (a truncated file) is named, and step 1 used
    shutil.copytree(shard, one)
    damaged = one / "checkpoints" / "step_00000002" / "optimizer_shards" / SHARD_FILES[1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", str(cfg), f"train.output_dir={one}", "train.fsdp_checkpoint=sharded",
                 "train.resume=true"]) == 0
    out = capsys.readouterr().out
    assert "optimizer_shards is unreadable or damaged" in out and "resumed from" in out and "step_00000001" in out
    # 2 sharded processes resume from step 2 (the killed save's leftovers removed)
    run = torchrun([*args, "train.resume=true"])
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    assert "resumed from" in run.stdout and "step_00000002" in run.stdout and "unfinished write" in run.stdout
    step3 = root / "step_00000003"
    assert_identical(weights(full, 3), sharded_checkpoint.consolidate(step3 / "model_shards"))
    assert_identical(optimizer_moments(full / "checkpoints" / "step_00000003"), optimizer_moments(step3))
    assert_same(weights(full, 3), weights(one, 3), weights(full, 2), 1e-3)  # 1 process vs 2: rounding
    rows = [[json.loads(x)["loss"] for x in open(run_dir / "metrics.jsonl")] for run_dir in (full, shard)]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    for run_dir, source, out in ((full, "3", "export_full"), (shard, "latest", "export_sharded")):
        assert main(["export", str(run_dir), "--to", str(tmp_path / out), "--source", source]) == 0
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / out).state_dict()
            for out in ("export_full", "export_sharded"))
    assert_identical(a, b)


def cfg_model(cfg: Path) -> str:
    return yaml.safe_load(open(cfg))["model"]["path"]


@needs_torchrun
@pytest.mark.parametrize("modality", ["sdxl", "sd3"])
def test_denoiser_two_sharded_processes_equal_one(tmp_path, modality):
    """A tiny SDXL UNet (units: down/mid/up blocks; LoRA, reference = adapters off on the sharded
    model; sharded checkpoints) and a tiny SD3 flow transformer (units: its transformer blocks;
    full fine-tuning with a sharded frozen reference; full-state checkpoints)."""
    from test_diffusion_families import family_config

    path = family_config(tmp_path, modality)
    cfg = yaml.safe_load(open(path))
    cfg["optim"] = ADAMW
    cfg["train"].update({"max_steps": 2, "log_every": 1})
    if modality == "sd3":
        cfg["lora"] = {"enabled": False}
    Path(path).write_text(yaml.safe_dump(cfg))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", path, f"train.output_dir={one}"]) == 0
    checkpoints = "sharded" if modality == "sdxl" else "full"  # LoRA weights and moments in per-process shards
    run = torchrun(["train", path, f"train.output_dir={two}", "train.batch_size=2", "train.fsdp=true",
                    f"train.fsdp_checkpoint={checkpoints}"])
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    assert "sharded over 2 processes" in run.stdout
    assert sharded_checkpoint.is_sharded_checkpoint(two / "checkpoints" / "step_00000002") == (modality == "sdxl")
    a, b = weights(one, 2), weights(two, 2)
    start = ({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in a.items()} if modality == "sdxl"
             else _denoiser_start(cfg["model"]["path"], a))
    # β = 5000 (Diffusion-DPO) amplifies float rounding (gradients reduced in another order and
    # kernels on half batches): measured 1.5e-3 of the move for sdxl; a wrong shard, reference or
    # draw gives differences of the move's own size.
    assert_same(a, b, start, 1e-2)


def _denoiser_start(pipeline: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers import SD3Transformer2DModel

    state = SD3Transformer2DModel.from_pretrained(pipeline, subfolder="transformer").state_dict()
    return {k: state[k] for k in like}


def test_wrap_policy_per_family(tiny_lm_dir, tmp_path):
    """The units: decoder layers (text LM), down/mid/up blocks (UNet), transformer blocks (flow)."""
    from transformers import AutoModelForCausalLM
    from diffusion_fixtures import save_tiny_pipeline
    from flow_fixtures import save_tiny_flow_pipeline
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    units = sharding.shard_units(lm)
    assert units == list(lm.model.layers) and len(units) == lm.config.num_hidden_layers
    save_tiny_pipeline(tmp_path / "sd", sdxl=True)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet")
    assert sharding.shard_units(unet) == [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    save_tiny_flow_pipeline(tmp_path / "sd3")
    flow = SD3Transformer2DModel.from_pretrained(tmp_path / "sd3", subfolder="transformer")
    assert sharding.shard_units(flow) == list(flow.transformer_blocks)
    assert sharding.unit_class_names(flow) == ["JointTransformerBlock"]


def test_accelerate_fsdp_config_is_fsdp2(monkeypatch):
    """configs/accelerate/fsdp.yaml, read by accelerate's own launcher, gives an FSDP2 plugin
    (the environment `accelerate launch` hands the processes), which the trainer answers by
    sharding with mmalign's policy."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "mmalign.cli", "train", "x"])
    args = _validate_launch_command(args)[0]
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.parametrize(("extra", "key"), [({"reference": {"sync_every": 2}}, "reference.sync_every"),
                                            ({"train": {"fsdp": True, "compile": "inductor"}}, "train.compile"),
                                            ({"loss": {"name": "nft"}}, "loss nft")])
def test_sharding_refuses_what_it_does_not_support(extra, key):
    from mmalign.config import Config, from_dict
    from mmalign.errors import ConfigError

    raw = {"model": {"path": "m"}, "data": {"train": "d"}, "train": {"fsdp": True}}
    for section, values in extra.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=key):
        sharding.check_sharding(from_dict(Config, raw))
    raw["train"]["fsdp"] = False
    sharding.check_sharding(from_dict(Config, raw))  # unsharded runs: no objection


def test_fsdp_checkpoint_key_is_checked():
    from mmalign.config import Config, from_dict
    from mmalign.errors import ConfigError

    raw = {"model": {"path": "m"}, "data": {"train": "d"}, "train": {"fsdp": True}}
    assert from_dict(Config, raw).train.fsdp_checkpoint == "full"  # one model.safetensors, as unsharded runs
    with pytest.raises(ConfigError, match="train.fsdp_checkpoint: 'shard' is not one of full, sharded"):
        from_dict(Config, {**raw, "train": {"fsdp": True, "fsdp_checkpoint": "shard"}})
