"""Reliability under faults (issue 23): no poisoned checkpoints, no silent overwrites, durable
writes, clear errors for bad config values. Each test fails on the code before the fix."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import ConfigError, load_config
from mmalign.errors import NonFiniteLossError
from mmalign.modalities import build_modality
from mmalign.train import checkpoint as ckpt
from mmalign.train.metrics import MetricsLogger
from mmalign.train.trainer import PreferenceTrainer

DEAD_PID = 999_999_999  # above Linux's pid_max: never a live process


def trainer_for(path, *overrides: str) -> PreferenceTrainer:
    cfg = load_config(path, list(overrides))
    model, likelihood, tokenizer = build_modality(cfg)
    return PreferenceTrainer(cfg, model, likelihood, tokenizer)


def params(trainer: PreferenceTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


def checkpoint_weights(run) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p / "model.safetensors")) for p in sorted((run / "checkpoints").glob("step_*"))}


# -- 1. a checkpoint only from finite weights -----------------------------------------------
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_infinite_gradient_norm_stops_before_the_step(make_config, tmp_path, max_grad_norm):
    """β = 1e30: the loss is finite (log 2 at step 0) but the gradient is not. Before the fix the run
    logged grad_norm Infinity every step, never moved and reported done."""
    cfg = make_config(loss={"beta": 1e30}, optim={"max_grad_norm": max_grad_norm}, train={"max_steps": 3})
    trainer = trainer_for(cfg)
    before = params(trainer)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is (inf|nan) at step 0; .*none written yet"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints").exists()
    for name, value in params(trainer).items():
        assert torch.equal(value, before[name]), name  # no optimizer step was taken


def test_huge_learning_rate_never_writes_a_nan_checkpoint(make_config, tmp_path):
    """lr = 1e30 used to write an all-NaN checkpoint that the NaN error then called the last good one."""
    cfg = make_config(optim={"lr": 1e30}, train={"max_steps": 6, "save_every": 1, "keep_last": 0})
    with pytest.raises(NonFiniteLossError, match=r"at step \d+") as err:
        trainer_for(cfg).fit()
    weights = checkpoint_weights(tmp_path / "run")
    for name, state in weights.items():
        assert all(torch.isfinite(v).all() for v in state.values()), name
    named = str(err.value).split("Last good checkpoint: ")[1].split(". ")[0]
    assert named == "none written yet" or os.path.basename(named) == max(weights)


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_skip_nonfinite_steps_skips_counts_and_then_stops(make_config):
    cfg = make_config(train={"max_steps": 4, "skip_nonfinite_steps": 1})
    trainer = trainer_for(cfg)
    original, poisoned_steps = trainer.likelihood.logps, {1, 2}

    def poisoned(model, batch, draw=None):
        out = original(model, batch, draw)
        if trainer.step in poisoned_steps and model.training:
            out.logps = NanGrad.apply(out.logps)
        return out

    trainer.likelihood.logps = poisoned
    assert trainer.train_step()["skipped_steps"] == 0
    before = params(trainer)
    values = trainer.train_step()  # step 1: skipped, weights unchanged
    assert values["skipped_steps"] == 1 and trainer.step == 2
    for name, value in params(trainer).items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is nan at step 2; .*1 step\(s\) skipped"):
        trainer.train_step()


# -- 2. nothing finished is overwritten silently -------------------------------------------
@pytest.mark.parametrize("remove", [["checkpoints"], ["checkpoints", "final"]])
def test_a_finished_run_is_not_overwritten(make_config, tmp_path, remove):
    cfg = make_config(train={"max_steps": 2})
    trainer_for(cfg).fit()
    run = tmp_path / "run"
    for name in remove:
        shutil.rmtree(run / name)
    history = (run / "metrics.jsonl").read_text()
    final = (run / "final").exists() and (run / "final" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds .*metrics.jsonl of another run; set train.resume=true"):
        trainer_for(cfg).fit()
    assert (run / "metrics.jsonl").read_text() == history
    assert final is False or (run / "final" / "model.safetensors").read_bytes() == final


@pytest.mark.parametrize("override,key", [("loss.beta=0.2", "loss.beta"), ("train.batch_size=4", "train.batch_size"),
                                          ("data.train=EVAL", "data.train"), ("loss.name=ipo", "loss.name")])
def test_resume_refuses_a_changed_experiment(make_config, toy_data, override, key):
    cfg = make_config(train={"max_steps": 1})
    trainer_for(cfg).fit()
    override = override.replace("EVAL", str(toy_data["eval"]))
    with pytest.raises(ConfigError, match=rf"train.resume: {key} is .* but the run in .*step_00000001 used"):
        trainer_for(cfg, "train.resume=true", "train.max_steps=2", override).fit()


# -- 3. durable writes ---------------------------------------------------------------------
def test_checkpoint_files_and_pointer_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name fsynced files")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), {"optimizer": {}}, {"config": {}})
    root = str(tmp_path / "checkpoints")
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert [events[i][1] for i in renames] == [f"{root}/.step_00000001.tmp", f"{root}/.latest.tmp-{os.getpid()}"]
    synced_first = {e[1] for e in events[: renames[0]] if e[0] == "fsync"}
    for name in ("model.safetensors", "trainer.pt", "state.json"):
        assert f"{root}/.step_00000001.tmp/{name}" in synced_first, name
    assert ("fsync", f"{root}/.latest.tmp-{os.getpid()}") in events[renames[0]: renames[1]]


def test_damaged_newest_checkpoint_is_named_and_the_previous_one_used(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 2, "save_every": 1})
    straight = trainer_for(cfg, f"train.output_dir={tmp_path / 'straight'}")
    straight.fit()
    interrupted = trainer_for(cfg)
    interrupted.fit()
    damaged = tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors"
    damaged.write_bytes(b"")  # a full disk / power loss emptied it
    resumed = trainer_for(cfg, "train.resume=true")
    resumed.fit()
    out = capsys.readouterr().out
    assert f"{damaged} is unreadable or damaged" in out
    assert "resumed from" in out and "step_00000001 at step 1" in out
    a, b = params(straight), params(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_metrics_torn_line_is_tolerated_and_the_file_replaced_not_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    inode = path.stat().st_ino
    MetricsLogger(tmp_path, True, resume_step=2, tensorboard=False).log(3, {"loss": 0.25})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25
    assert path.stat().st_ino != inode  # an atomic replacement: a kill mid-trim keeps the old file
    kept = path.read_text()
    inode = path.stat().st_ino
    MetricsLogger(tmp_path, True, resume_step=3, tensorboard=False)  # nothing to drop: untouched
    assert path.read_text() == kept and path.stat().st_ino == inode


def test_stale_temporary_files_are_cleaned_at_start(make_config, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step_00000009.tmp").mkdir(parents=True)
    stale = [run / f".metrics.jsonl.tmp-{DEAD_PID}", run / "checkpoints" / f".latest.tmp-{DEAD_PID}"]
    live = run / f".other.json.tmp-{os.getpid()}"  # a writer still running: kept
    for p in [*stale, live]:
        p.write_text("half")
    trainer_for(make_config(train={"max_steps": 1})).fit()
    assert not any(p.exists() for p in stale) and not (run / "checkpoints" / ".step_00000009.tmp").exists()
    assert live.exists()


# -- 4. config values validated at load ----------------------------------------------------
@pytest.mark.parametrize("text,message", [
    ("train: {log_every: 0}\n", "train.log_every must be >= 1, got 0"),
    ("train: {save_every: -1}\n", "train.save_every must be >= 0 (0 = only at the end), got -1"),
    ("train: {eval_every: -2}\n", "train.eval_every must be >= 0"),
    ("optim: {lr: 0}\n", "optim.lr must be finite and > 0, got 0.0"),
    ("optim: {lr: .nan}\n", "optim.lr must be finite and > 0, got nan"),
    ("optim: {lr: -1e-5}\n", "optim.lr must be finite and > 0"),
    ("optim: {eps: 0}\n", "optim.eps must be finite and > 0, got 0.0"),
    ("optim: {betas: [0.9]}\n", "optim.betas must be two values in [0, 1), got [0.9]"),
    ("optim: {betas: [0.9, 1.0]}\n", "optim.betas must be two values in [0, 1)"),
    ("lora: {r: 0}\n", "lora.r must be >= 1, got 0"),
    ("train: {max_steps: 3\n", "malformed YAML at line 2, column 1"),
    ("train:\n  max_steps: 3\n bad: [\n", "malformed YAML at line"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_documented_zero_offs_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {save_every: 0, eval_every: 0, validate_every: 0, keep_last: 0}\n"
                    "optim: {max_grad_norm: 0, betas: [0.0, 0.0]}\n")
    cfg = load_config(path)
    assert cfg.train.save_every == 0 and cfg.optim.max_grad_norm == 0
