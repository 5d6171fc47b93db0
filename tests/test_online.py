"""Online rounds (`online:`): a round's records are what the strategy gives for the sampled scores
(hand-checked), bad `online:` values name their key, the tiny LM run resumes bit-exactly from its
saved rounds, and the tiny LM and SD configs train end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import ConfigError, load_config
from mmalign.families import get_family
from mmalign.online import OnlineSource
from mmalign.online.rounds import plan_rows, select_records, soft_label
from mmalign.online.samplers import SAMPLERS, sampler_for
from online_fixtures import Accelerator, fake_source

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "configs/tiny/lm_online_dpo.yaml"
SD = ROOT / "configs/tiny/sd_online_dpo.yaml"
QUIET = ["train.progress=false", "train.tensorboard=false"]


# -- a round by hand: 2 prompts x 2 samples, a deterministic fake sampler, the text_length scorer --------
ANSWERS = {("p one", 0): "a b c", ("p one", 1): "a", ("p two", 0): "x y", ("p two", 1): "x y z w"}


def fake_text(ctx, model, job):
    """Answer of (prompt, sample j) from ANSWERS; j is the position inside the prompt's group."""
    return [{"kind": "text", "text": ANSWERS[(p, i % 2)]} for i, p in enumerate(job.prompts)]


def hand_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> OnlineSource:
    return fake_source(tmp_path, monkeypatch, fake_text, *overrides)


@pytest.mark.parametrize("strategy", ["best_worst", "soft", "ranked"])
def test_round_records_are_the_strategy_of_the_sampled_scores(tmp_path, monkeypatch, strategy):
    source = hand_source(tmp_path, monkeypatch, f"online.strategy={strategy}")
    got = source.records_for_step(0, torch.nn.Linear(1, 1), Accelerator())
    prompts = source.round_prompts(0)
    best = {"p one": ("a b c", "a", 2.0), "p two": ("x y z w", "x y", 2.0)}  # words: 3 vs 1, 4 vs 2
    if strategy == "ranked":
        assert source.kind == "ranked"
        assert [(r["prompt"], r["completions"], r["scores"]) for r in got.records] == \
            [(p, list(best[p][:2]), [float(len(best[p][0].split())), float(len(best[p][1].split()))]) for p in prompts]
    else:
        assert [(r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in got.records] == \
            [(p, *best[p]) for p in prompts]
    if strategy == "soft":
        assert [r["soft_label"] for r in got.records] == [pytest.approx(1 / (1 + 2.718281828459045 ** -2))] * 2
        assert soft_label(0.0, 1.0) == 0.5
    # saved: samples with their scores, records, meta with the fingerprint; read back without sampling
    folder = tmp_path / "rounds" / "round_00000"
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert [(s["text"], s["score_text_length"], s["score"]) for s in samples][:2] == \
        [(ANSWERS[(prompts[0], 0)], *[float(len(ANSWERS[(prompts[0], 0)].split()))] * 2),
         (ANSWERS[(prompts[0], 1)], *[float(len(ANSWERS[(prompts[0], 1)].split()))] * 2)]
    monkeypatch.setitem(SAMPLERS, "text", lambda *a: pytest.fail("a saved round was sampled again"))
    again = hand_source(tmp_path, monkeypatch, f"online.strategy={strategy}")
    assert again.records_for_step(1, torch.nn.Linear(1, 1), Accelerator()).records == got.records


def test_round_seeds_depend_on_seed_round_slot_and_sample_only():
    rows = plan_rows(["a", "b"], 2, seed=3, round_index=1)
    assert [r["id"] for r in rows] == ["r00001-p000-s00", "r00001-p000-s01", "r00001-p001-s00", "r00001-p001-s01"]
    assert len({r["seed"] for r in rows}) == 4
    assert rows == plan_rows(["a", "b"], 2, seed=3, round_index=1)
    assert rows[0]["seed"] != plan_rows(["a", "b"], 2, seed=3, round_index=2)[0]["seed"]


def test_margin_strategy_drops_small_gaps_and_ties():
    rows = [{"id": f"s{j}", "prompt_index": 0, "prompt": "p", "sample": j, "seed": j, "kind": "text",
             "text": t, "score": s} for j, (t, s) in enumerate([("a", 3.0), ("b", 2.5), ("c", 1.0), ("d", 1.0)])]
    records, selection = select_records(rows, SimpleNamespace(strategy="margin", margin=1.0, list_size=0), 5.0, True)
    assert [(r["chosen"], r["rejected"]) for r in records] == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]
    assert selection.counts["dropped_tie"] == 1 and selection.counts["dropped_low_margin"] == 1


# -- families: chosen from the descriptor ---------------------------------------------------------
def test_online_sampler_comes_from_the_family_descriptor():
    assert sampler_for(get_family("causal_lm")) is SAMPLERS["text"]
    assert sampler_for(get_family("sd")) is SAMPLERS["images"]
    assert sampler_for(get_family("flux")) is SAMPLERS["images"]
    assert sampler_for(get_family("llava")) is SAMPLERS["vlm"]  # kind "vlm": prompts with images
    assert sampler_for(get_family("audioldm2")) is SAMPLERS["audio"]
    assert sampler_for(get_family("tango")) is SAMPLERS["audio"]
    with pytest.raises(ConfigError, match="own online data"):
        sampler_for(get_family("sd_spo"))


# -- config errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("online.group_size=1", "online.group_size must be >= 2"),
    ("online.round_steps=0", "online.round_steps must be >= 1"),
    ("online.strategy=best", "online.strategy: 'best' is not one of"),
    ("online.scorer=[]", "online.scorer is empty"),
    ("online.scorer=[nosuch=x]", r"online.scorer\[0\]: .*unknown scorer"),
    ("online.margin=-1", "online.margin must be >= 0"),
    ("online.list_size=9", "online.list_size must be 0 or in"),
    ("online.soft_temperature=0", "online.soft_temperature must be > 0"),
    ("online.sampling=3", "online.sampling: expected a mapping"),
    ("online.sample_size=3", "unknown config key 'online.sample_size'; did you mean 'sample_batch_size'"),
    ("data.train=x.jsonl", "data.train with online: set online.offline_per_round"),
    ("online.offline_per_round=2", "online.offline_per_round=2 needs data.train"),
    ("online.eval_scorer=[text_length=words]", "online.eval_scorer needs held-out prompts"),
    ("online.eval_prompt_list=[a]", "need online.eval_scorer"),
    ("online.reference_update=always", "online.reference_update: .always. is not one of"),
    ("lora.enabled=true online.reference_update=every_round", "needs full fine-tuning"),
    ("reference.strategy=precomputed", "precomputed' cannot score records sampled during training"),
])
def test_bad_online_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(LM, override.split())


def test_bad_online_prompts_and_sampling_name_the_key(tmp_path, capsys):
    assert main(["train", str(LM), f"train.output_dir={tmp_path / 'a'}", "online.prompt_list=[]",
                 "online.prompts=none.txt", *QUIET]) == 2
    assert "mmalign: error: online.prompts: prompt file not found: 'none.txt'" in capsys.readouterr().err
    assert main(["train", str(LM), f"train.output_dir={tmp_path / 'b'}", "online.sampling={steps: 3}", *QUIET]) == 2
    assert "mmalign: error: online.sampling: unknown sampling parameter 'steps'" in capsys.readouterr().err


# -- end to end ------------------------------------------------------------------------------------
def lm_run(out: Path, *overrides: str) -> int:
    return main(["train", str(LM), f"train.output_dir={out}", "online.round_steps=2", "train.log_every=1",
                 *QUIET, *overrides])


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((out / "final").glob("*.safetensors"))))


def test_tiny_lm_online_run_trains_and_resumes_exactly(tmp_path, capsys):
    assert lm_run(tmp_path / "a", "train.max_steps=4") == 0
    log = capsys.readouterr().out
    assert "online round 0:" in log and "online round 1:" in log
    assert sorted(p.name for p in (tmp_path / "a" / "rounds").iterdir()) == ["round_00000", "round_00001"]
    # killed after step 3 (mid round 1), resumed to 4: round 1 is read back, the weights equal run a's
    assert lm_run(tmp_path / "b", "train.max_steps=3") == 0
    capsys.readouterr()
    assert lm_run(tmp_path / "b", "train.max_steps=4", "train.resume=true") == 0
    assert "online round" not in capsys.readouterr().out  # nothing sampled again
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_sd_online_run_samples_images_and_trains(tmp_path, capsys):
    out = tmp_path / "sd"
    assert main(["train", str(SD), f"train.output_dir={out}", "train.max_steps=2", "online.round_steps=2",
                 "online.prompts_per_round=2", "online.group_size=2", "online.sampling={num_inference_steps: 2}",
                 "train.batch_size=2", *QUIET]) == 0
    assert "online round 0:" in capsys.readouterr().out
    folder = out / "rounds" / "round_00000"
    assert len(list((folder / "media").glob("*.png"))) == 4
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert records and all((folder / r["chosen"]).is_file() and r["scores"][0] > r["scores"][1] for r in records)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
