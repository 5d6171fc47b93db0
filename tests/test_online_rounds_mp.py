"""Online rounds in several processes (issue 15, item 2): each process samples its share of a
round (global batches, batch b on process b mod 2), the outputs are gathered and every process
builds the same records. 2 processes == 1 process: the same samples, scores, records, guard
metrics and final weights, for an online text-LM run, an online SD (tiny UNet) run and an online
VLM run (tiny LLaVA, LoRA, answers about toy-world scenes scored against their annotations, a
held-out guard on other scenes). All runs go through torchrun with one thread per process, so the
kernels see the same batches and threads; new modalities add a `MpRun` to RUNS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import needs_torchrun
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.log_every=1"]


def launch(args: list[str], nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node NPROC -m mmalign.cli ARGS` on a free port, one thread per process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=port)
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(nproc),
           "--master_port", port, "-m", "mmalign.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class MpRun:
    """One online run compared in 1 and 2 processes: its config, overrides, the world batch
    (1 process x world_batch == 2 x world_batch / 2), its rounds and tolerances."""

    config: str
    overrides: list[str]
    world_batch: int
    rounds: int
    score_tol: float  # |score two - score one| (learned scorers see other pixels' rounding)
    weight_tol: float  # max |weights two - one| over max |weights one - initial|
    assets: Callable[[Path], list[str]] | None = None  # writes the run's files under a folder -> overrides


def llava_assets(root: Path) -> list[str]:
    """A tiny random LLaVA, 8 training scenes and 3 held-out scenes (toy world) -> their overrides."""
    from mmalign.toyvlm import save_tiny_llava
    from mmalign.toyworld.world import write_world

    save_tiny_llava(root / "llava")
    write_world(root / "scenes", 8, seed=0, split="train", kind="scenes")
    write_world(root / "scenes", 3, seed=1, split="test", kind="scenes")
    return [f"model.path={root / 'llava'}", f"online.prompts={root / 'scenes/train.jsonl'}",
            f"online.eval_prompts={root / 'scenes/test.jsonl'}"]


RUNS = {
    # 4 prompts x 4 samples in global batches of 4: each process samples 2 of the 4 batches;
    # held-out prompts scored by a separate scorer; round 1 is sampled by the trained weights.
    "lm": MpRun("configs/tiny/lm_online_dpo.yaml",
                ["online.round_steps=2", "train.max_steps=4", "online.sample_batch_size=4",
                 "online.eval_scorer=[text_length=words]", "online.eval_prompt_list=['scene : cup . describe :']",
                 "online.eval_samples=3", "optim.name=sgd", "optim.lr=0.5"], 4, 2, 0.0, 1e-4),
    # 2 captions x 2 images in global batches of 2: one batch per process; a new round every step.
    # Weights: 8.6e-4 of how far training moved them (measured): the diffusion loss's kernels see
    # batch 2 vs 1 (~1e-8 in the mse, x beta 2000, as in test_distributed); a process-dependent
    # sample or draw would give differences of the update's own size.
    "sd": MpRun("configs/tiny/sd_online_dpo.yaml",
                ["online.round_steps=1", "train.max_steps=2", "online.prompts_per_round=2", "online.group_size=2",
                 "online.sample_batch_size=2", "online.sampling={num_inference_steps: 2}", "optim.name=sgd",
                 "optim.lr=1.0"], 2, 2, 1e-4, 3e-3),
    # 4 scenes x 4 answers in global batches of 4: each process samples 2 of the 4 batches; 3
    # held-out scenes x 2 answers (batches of 4 and 2) scored against their own annotations.
    "llava": MpRun("configs/tiny/llava_online_dpo.yaml",
                   ["online.sample_batch_size=4", "online.eval_samples=2",
                    "online.eval_scorer=[\"annotations=pkg://vocab/toyworld_objects.txt\"]", "optim.name=sgd",
                    "optim.lr=0.5"], 4, 2, 0.0, 1e-4, llava_assets),
}


def initial_weights(config: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    """The trained weights before training (the config's model, built as `train` builds it; with
    LoRA the seeded adapter's weights, keyed as the exported adapter file)."""
    from peft.utils import get_peft_model_state_dict

    from mmalign.config import load_config
    from mmalign.modalities import build_modality
    from mmalign.train.setup import apply_lora

    cfg = load_config(ROOT / config, overrides)
    model = build_modality(cfg)[0]
    return get_peft_model_state_dict(apply_lora(model, cfg)) if cfg.lora.enabled else model.state_dict()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_round(one: Path, two: Path, run: MpRun) -> None:
    """Same samples (texts exactly; images to one grey level), scores, records and meta counts."""
    a, b = rows(one / "samples.jsonl"), rows(two / "samples.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] and a
    for ra, rb in zip(a, b, strict=True):
        assert ra.get("text") == rb.get("text") and ra.get("path") == rb.get("path")
        assert rb["score"] == pytest.approx(ra["score"], abs=run.score_tol)
        if "path" in ra:
            pa, pb = (np.asarray(Image.open(d / ra["path"]), dtype=np.int16) for d in (one, two))
            assert np.abs(pa - pb).max() <= 1, ra["id"]
    ra, rb = rows(one / "records.jsonl"), rows(two / "records.jsonl")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in ra] == [(r["prompt"], r["chosen"], r["rejected"])
                                                                      for r in rb] and ra
    assert json.loads((one / "meta.json").read_text())["counts"] == json.loads((two / "meta.json").read_text())["counts"]


@needs_torchrun
@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_sample_and_train_like_one(tmp_path, name):
    run = RUNS[name]
    overrides = [*run.overrides, *(run.assets(tmp_path / "assets") if run.assets else [])]
    outs = {n: tmp_path / f"p{n}" for n in (1, 2)}
    for n, out in outs.items():
        done = launch(["train", str(ROOT / run.config), f"train.output_dir={out}",
                       f"train.batch_size={run.world_batch // n}", *QUIET, *overrides], n)
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"2 process(es) x batch {run.world_batch // 2}" in done.stdout
    held_out = any(o.startswith("online.eval_scorer") for o in run.overrides)
    for r in range(run.rounds):
        folder = f"rounds/round_{r:05d}"
        assert_same_round(outs[1] / folder, outs[2] / folder, run)
        if held_out:  # the held-out answers (a VLM's about their own images) are the same too
            ea, eb = (rows(outs[n] / folder / "eval" / "samples.jsonl") for n in (1, 2))
            assert [(x["text"], x.get("images"), x["score"]) for x in ea] == \
                [(x["text"], x.get("images"), x["score"]) for x in eb] and ea
    # the guard metrics of each round (held-out reward, KL) agree too
    ma, mb = (rows(outs[n] / "metrics.jsonl") for n in (1, 2))
    guards = [(x, y) for x, y in zip(ma, mb, strict=True) if "online/round" in x]
    assert len(guards) == run.rounds and all("online/round" in y for _, y in guards)
    assert not held_out or all("online/eval_reward_mean" in x for x, _ in guards)
    for x, y in guards:
        for key in ("online/reward_mean", "online/reward_std", "online/tie_fraction", "online/kept_records",
                    "online/kl", "online/eval_reward_mean"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=max(run.score_tol, 1e-5)), key
    a, b = (load_file(str(next((outs[n] / "final").glob("*.safetensors")))) for n in (1, 2))
    assert a.keys() == b.keys() and a
    start = initial_weights(run.config, overrides)
    moved = max(float((a[k].double() - start[k].double()).abs().max()) for k in a if k in start)
    diffs = {k: float((b[k].double() - a[k].double()).abs().max()) for k in a}
    print(f"{name}: weights moved {moved:.3g}, max |two - one| {max(diffs.values()):.3g}")
    assert moved > 0, "training did not move the weights: the comparison would be vacuous"
    assert max(diffs.values()) <= run.weight_tol * moved, (moved, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
