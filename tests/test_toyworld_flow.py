"""The shipped toy flow model pkg://toyworld/flow (pipelines/train_toy_flow.py): a small fp16
StableDiffusion3Pipeline folder that family sd3 loads and trains, whose conditioning in training
equals the pipeline's, and whose samples the exact checker reads as the asked object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import resolve_path
from mmalign.toyworld import checker, world
from mmalign.toyworld.models import FLOW_PATH, shipped_size

PATH = Path(resolve_path(FLOW_PATH))


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(PATH, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_config(pairs: Path):
    from mmalign.config import Config, from_dict

    return from_dict(Config, {"modality": "sd3", "model": {"path": FLOW_PATH}, "data": {"train": str(pairs)},
                              "diffusion": {"resolution": 16, "caption_dropout": 0.0}})


def test_shipped_flow_folder_is_small_fp16_sd3():
    from safetensors import safe_open

    assert 0 < shipped_size(PATH) < 3.2e6
    index = json.loads((PATH / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    files = list(PATH.rglob("*.safetensors"))
    assert len(files) == 5  # transformer, vae, three text encoders
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_training_conditioning_equals_the_pipelines(pipe, tmp_path):
    """Family sd3's text encoding of a prompt == StableDiffusion3Pipeline.encode_prompt's (what it samples with)."""
    from mmalign.modalities import build_modality

    _, likelihood, _ = build_modality(sd3_config(tmp_path / "unused.jsonl"))
    prompts = ["a red circle", ""]
    ours = likelihood.encode_text(prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
    hidden = ours["encoder_hidden_states"]
    assert hidden.shape == embeds.shape == (2, 24 + 256, 64)
    torch.testing.assert_close(hidden, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pooled_projections"], pooled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hidden[0], hidden[1])  # the prompt matters


def test_family_sd3_trains_the_shipped_model(tmp_path):
    """Flow-DPO log-likelihoods of one world pair are finite and give the transformer gradients."""
    from mmalign.modalities import build_modality

    rows = [json.loads(line) for line in world.write_world(tmp_path, 2, 0, "train", "objects")["jsonl"].open()]
    record = {"prompt": rows[0]["caption"], "chosen": rows[0]["image"], "rejected": rows[1]["image"]}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(record) + "\n")
    transformer, likelihood, _ = build_modality(sd3_config(tmp_path / "pairs.jsonl"))
    assert type(transformer).__name__ == "SD3Transformer2DModel"
    batch = likelihood.collate([record], "pair")
    logps = likelihood.logps(transformer, batch, likelihood.draw(batch, torch.Generator().manual_seed(0))).logps
    assert logps.shape == (2,) and torch.isfinite(logps).all()
    logps.sum().backward()
    assert transformer.proj_out.weight.grad.abs().sum() > 0


def test_samples_show_the_asked_colour_and_shape(pipe):
    """Seeded samples of circles and squares: the exact checker scores them against the asked caption well
    above the same images against the next colour (an untrained model's blur scores 0 against both)."""
    colours = list(world.COLOURS)
    prompts = [f"a {c} {s}" for s in ("circle", "square") for c in colours if (c, s) not in world.HELDOUT_COMBOS]
    wrong = [f"a {colours[(colours.index(p.split()[1]) + 1) % 4]} {p.split()[2]}" for p in prompts]
    gens = [torch.Generator().manual_seed(world.HELDOUT_SEED_START + i) for i in range(len(prompts))]
    images = pipe(prompts, generator=gens, num_inference_steps=10, guidance_scale=1.0, output_type="pil").images
    assert images[0].size == (16, 16)
    asked, other = checker.image_scores(images, prompts), checker.image_scores(images, wrong)
    assert asked.mean() > 0.2 and other.mean() < 0.05, (asked, other)


# -- the toy-world configs train from the shipped model ------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.log_every=1"]


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_toyworld_flow_dpo_config_trains(tmp_path):
    from mmalign.cli import main

    rows = [json.loads(line) for line in world.write_world(tmp_path, 4, 0, "train", "objects")["jsonl"].open()]
    pairs = [{"prompt": rows[i]["caption"], "chosen": rows[i]["image"], "rejected": rows[i + 1]["image"]}
             for i in (0, 2)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "dpo"
    assert main(["train", str(ROOT / "configs/tiny/toyworld_flow_dpo.yaml"), f"data.train={tmp_path / 'pairs.jsonl'}",
                 f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2", *QUIET]) == 0
    metrics = metrics_of(out)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    assert abs(metrics[0]["loss"] - np.log(2)) < 1e-3  # step 0: policy == frozen reference
    assert (out / "final").is_dir()


def test_toyworld_flow_grpo_config_trains(tmp_path, capsys):
    from mmalign.cli import main

    out = tmp_path / "grpo"
    assert main(["train", str(ROOT / "configs/tiny/toyworld_flow_grpo.yaml"), f"train.output_dir={out}",
                 "grpo.prompts_per_round=2", "grpo.group_size=2", "grpo.num_steps=4", "grpo.round_steps=2",
                 "grpo.sample_batch_size=4", "train.batch_size=6", "train.max_steps=2", *QUIET]) == 0
    assert "grpo round 0: 4 trajectories" in capsys.readouterr().out
    metrics = metrics_of(out)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)


def test_toyworld_flow_nft_config_trains(tmp_path, capsys):
    from mmalign.cli import main

    out = tmp_path / "nft"
    assert main(["train", str(ROOT / "configs/tiny/toyworld_flow_nft.yaml"), f"train.output_dir={out}",
                 "online.prompts_per_round=2", "online.group_size=2", "online.round_steps=2",
                 "online.sample_batch_size=4", "online.sampling={num_inference_steps: 3, guidance_scale: 1.0}",
                 "train.batch_size=2", "train.max_steps=2", *QUIET]) == 0
    assert "online round 0: 4 rewarded samples" in capsys.readouterr().out
    records = [json.loads(x) for x in (out / "rounds/round_00000/records.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(0 <= r["optimality"] <= 1 for r in records)
    metrics = metrics_of(out)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
