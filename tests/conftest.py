"""Shared tiny fixtures: a 2-layer Llama with a word-level tokenizer built in code (no
downloads), saved once per session, and toy preference files of each format."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m mmalign.cli ARGS` on a free port (tests may run side by
    side), one thread per process; returns the finished process (stdout, stderr as text)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=port)
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
           "--master_port", port, "-m", "mmalign.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


needs_torchrun = pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                                    reason="torchrun missing")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    from mmalign.toytext import build_tiny_llama, build_word_tokenizer

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = build_word_tokenizer()
    model = build_tiny_llama(len(tokenizer), seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    """Pairs of the grounded-answer rule (train and held-out), plus unpaired and ranked files."""
    from mmalign.toytext import make_toy_pairs

    root = tmp_path_factory.mktemp("toy_data")
    train, held_out = make_toy_pairs(512, seed=1), make_toy_pairs(128, seed=2)
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in train[:128] for k in ("chosen", "rejected")]
    ranked = [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"], r["chosen"] + " ."],
               "scores": [0.0, 1.0, 0.5]} for r in train[:128]]
    return {"train": write_jsonl(root / "train.jsonl", train),
            "eval": write_jsonl(root / "eval.jsonl", held_out),
            "unpaired": write_jsonl(root / "unpaired.jsonl", unpaired),
            "ranked": write_jsonl(root / "ranked.jsonl", ranked)}


@pytest.fixture
def make_config(tmp_path, tiny_lm_dir, toy_data):
    """Write a run config for the tiny LM; keyword sections override the defaults."""

    def make(**sections) -> Path:
        cfg = {
            "model": {"path": str(tiny_lm_dir)},
            "data": {"train": str(toy_data["train"]), "max_length": 48},
            "loss": {"name": "dpo", "beta": 0.1},
            "optim": {"lr": 1e-3},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 8,
                      "log_every": 1, "progress": False, "tensorboard": False},
        }
        for section, values in sections.items():
            cfg.setdefault(section, {}).update(values)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make
