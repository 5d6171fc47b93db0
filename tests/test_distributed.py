"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the
same global batch: data sharding, gradient averaging, gradient accumulation and the
all-reduced batch statistic of bco_pair all line up."""

from __future__ import annotations

import json

import pytest
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

