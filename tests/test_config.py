"""Typed config loading: unknown keys, wrong types, overrides, and every shipped YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_values_are_typed_and_overrides_apply(tmp_path):
    cfg = load_config(write(tmp_path, "loss: {name: ipo, beta: 1}\noptim: {lr: 1e-5}\n"),
                      ["train.max_steps=7", "lora.target_modules=[q_proj]", "optim.betas=[0.9, 0.95]"])
    assert cfg.loss.name == "ipo" and cfg.loss.beta == 1.0 and isinstance(cfg.loss.beta, float)
    assert cfg.optim.lr == 1e-5  # YAML 1.1 reads "1e-5" as a string: cast
    assert cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.train.batch_size == 8  # default kept


def test_data_files_are_a_path_or_a_list_of_paths(tmp_path):
    assert load_config(write(tmp_path, "data: {train: a.jsonl}\n")).data.train == "a.jsonl"
    cfg = load_config(write(tmp_path, ""), ["data.train=[a.jsonl, b.jsonl]"])
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match=r"data.train\[1\]: expected str, got 3"):
        load_config(write(tmp_path, "data: {train: [a.jsonl, 3]}\n"))


@pytest.mark.parametrize("text,overrides,message", [
    ("trian: {max_steps: 3}\n", [], "unknown config key 'trian'; did you mean 'train'?"),
    ("loss: {betta: 0.1}\n", [], "unknown config key 'loss.betta'; did you mean 'beta'?"),
    ("", ["optim.learning_rate=3"], "unknown config key 'optim.learning_rate'"),
    ("train: {max_steps: ten}\n", [], "train.max_steps: expected an integer, got 'ten'"),
    ("data: {train: 3}\n", [], "data.train: expected a list, got 3"),
    ("lora: {enabled: 'yes'}\n", [], "lora.enabled: expected true/false"),
    ("train: {mixed_precision: fp8}\n", [], "train.mixed_precision: 'fp8' is not one of no, bf16, fp16"),
    ("loss: {beta: 0}\n", [], "loss.beta must be > 0"),
    ("loss: {name: dpoo}\n", [], "loss.name: unknown loss 'dpoo'; did you mean 'dpo'?"),
    ("modality: llavaa\n", [], "modality: unknown modality 'llavaa'; did you mean 'llava'?"),
    ("loss: {name: dpo, gamma: 0.5}\n", [], "loss.gamma=0.5 is a hyperparameter of cpo_simpo, simpo, not of loss 'dpo'"),
    ("reference: {strategy: lora_disabled}\n", [], "needs lora.enabled: true"),
    ("", ["train.max_steps"], "not of the form section.key=value"),
])
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


ACCELERATE = ROOT / "configs" / "accelerate"  # launcher configs (accelerate's format), not run configs


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").rglob("*.yaml") if ACCELERATE not in p.parents),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# "), f"{path} must start with a comment giving the command that runs it"
    load_config(path)


@pytest.mark.parametrize("path", sorted(ACCELERATE.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_in_accelerate(path):
    """accelerate's own reader accepts them (it refuses unknown keys) and sees the intended backend."""
    from accelerate.commands.config.config_args import ClusterConfig

    assert path.read_text().startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} ")
    cfg = ClusterConfig.from_yaml_file(path)
    expected = {"ddp": "MULTI_GPU", "multi_node": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED",
                "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}[path.stem]
    assert cfg.distributed_type.value == expected
    if expected == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])
