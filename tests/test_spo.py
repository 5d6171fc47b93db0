"""SPO / D3PO: the clipped loss on hand-computed values, pair selection on hand-made scores, the
online samplers (candidates share x_t, trajectories continue, D3PO labels), config checks, and
a short tiny-model `mmalign train` run with its rounds and an exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import save_tiny_pipeline
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import Config, ConfigError, from_dict
from mmalign.losses import dpo_loss, get_loss, spo_loss
from mmalign.modalities import build_modality
from mmalign.modalities.step_sampler import (
    TimestepAgnostic, load_step_scorer, sample_d3po_pairs, sample_spo_pairs, select_pairs,
)
from mmalign.types import PairLogps

ROOT = Path(__file__).resolve().parents[1]


# -- the loss --------------------------------------------------------------------------------------
def test_spo_loss_clips_the_log_ratios_hand_computed():
    policy = PairLogps(torch.tensor([-1.00, -1.00]), torch.tensor([-1.00, -1.00]))
    reference = PairLogps(torch.tensor([-1.05, -1.05]), torch.tensor([-0.80, -1.02]))
    # row 0: log r_c = 0.05 (inside [log .9, log 1.1]); log r_r = -0.2 -> clipped to log 0.9 = -0.1053605
    #   -log σ(10 (0.05 + 0.1053605)) = log(1 + e^-1.553605) = 0.191846
    # row 1: log r_c = 0.05, log r_r = 0.02: -log σ(10 · 0.03) = log(1 + e^-0.3) = 0.554355
    loss = spo_loss(policy, reference, beta=10.0, clip=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.191846, 0.554355]), rtol=0, atol=1e-5)
    assert float(spo_loss(policy, policy, beta=10.0, clip=0.1)[0]) == pytest.approx(math.log(2), abs=1e-6)
    # clip 0 is plain DPO; a clipped ratio passes no gradient
    torch.testing.assert_close(spo_loss(policy, reference, beta=10.0, clip=0.0), dpo_loss(policy, reference, beta=10.0))
    rejected = torch.tensor([-1.0, -1.0], requires_grad=True)
    spo_loss(PairLogps(policy.chosen, rejected), reference, beta=10.0, clip=0.1).sum().backward()
    assert rejected.grad[0] == 0 and rejected.grad[1] > 0
    assert get_loss("spo").kind == "pair" and get_loss("d3po").kind == "pair"


# -- selection on hand-made scores -------------------------------------------------------------------
def test_select_pairs_softmax_gap_threshold_and_ties():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.1, 0.3, 0.2]])
    best, worst, keep, gap = select_pairs(scores, threshold=0.5)
    # softmax([0, 1, 2, 3]) = [0.032059, 0.087144, 0.236883, 0.643914]: gap 0.611856
    assert gap[0] == pytest.approx(0.611856, abs=1e-6) and gap[1] == 0
    assert best.tolist()[:1] == [3] and worst.tolist()[:1] == [0] and best[2] == 0 and worst[2] == 1
    assert keep.tolist() == [True, False, False]
    assert select_pairs(scores, threshold=0.62)[2].tolist() == [False, False, False]
    # scaling the scores sharpens the softmax: 100 x a 0.4 spread keeps row 2
    assert select_pairs(scores, threshold=0.5, scale=100.0)[2].tolist() == [True, False, True]


class Recorder:
    """A step-aware scorer that remembers its calls; scores = the candidate's row mean (distinct)."""

    def __init__(self) -> None:
        self.calls = []

    def score(self, prompts, images, timesteps):
        self.calls.append((list(prompts), images.clone(), timesteps.clone()))
        return images.mean(dim=(1, 2, 3)) * 1000


def test_timestep_agnostic_wrapper_and_loading():
    class Plain:
        def score(self, prompts, images):
            return torch.ones(len(prompts))

    wrapped = TimestepAgnostic(Plain())
    assert wrapped.score(["a", "b"], torch.zeros(2, 3, 4, 4), torch.tensor([5, 9])).tolist() == [1.0, 1.0]
    red = load_step_scorer("redness", None)
    images = torch.zeros(2, 3, 2, 2)
    images[0, 0] = 1.0  # pure red: 1 - 0; second image black: 0
    assert red.score(["x", "y"], images, torch.tensor([0, 0])).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="spo.scorer"):
        load_step_scorer("nope", None)


# -- the samplers on the tiny SD pipeline ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_pipeline(tmp_path_factory.mktemp("sd"))
    cfg = from_dict(Config, {"modality": "sd_spo", "model": {"path": str(path)}, "diffusion": {"resolution": 16},
                             "spo": {"prompt_list": ["a red circle"], "num_steps": 6, "candidates": 3,
                                     "threshold": 0.0, "first_step": 1, "guidance": 3.0}})
    return build_modality(cfg)[:2]


def test_spo_candidates_share_x_t_and_the_trajectory_continues_from_one(tiny):
    unet, likelihood = tiny
    scorer = Recorder()
    records, counts = sample_spo_pairs(likelihood, unet, ["a red circle", "a blue square"], scorer,
                                       torch.Generator().manual_seed(0))
    steps = [i for i in range(6) if i >= 1]  # first_step 1; σ > 0 at every step (the last: set_alpha_to_one)
    ts, prevs = likelihood.timesteps()
    usable = [i for i in steps if prevs[i] >= 0]  # the tiny config's last step is deterministic: skipped
    assert counts["steps"] == 2 * len(usable) and len(records) == counts["kept"] == 2 * len(usable)
    assert len(scorer.calls) == len(usable) and scorer.calls[0][0] == ["a red circle"] * 3 + ["a blue square"] * 3
    assert scorer.calls[0][2].tolist() == [int(prevs[usable[0]])] * 6  # candidates scored at their own timestep
    for prompt in ("a red circle", "a blue square"):
        mine = [r for r in records if r["prompt"] == prompt]
        for r in mine:
            # both candidates are draws from N(μ(x_t), σ²) of the SAME x_t: z² averages ~1 for each
            for sample in (r["chosen"], r["rejected"]):
                assert 0.6 < z2(likelihood, unet, prompt, r["x_t"], r["timestep"], r["prev_timestep"], sample) < 1.5
            # chosen / rejected are the candidates whose decoded x̂0 scored highest / lowest
            got = [candidate_score(likelihood, unet, prompt, r[k], r["prev_timestep"]) for k in ("chosen", "rejected")]
            assert got == pytest.approx([max(r["scores"]), min(r["scores"])], rel=1e-4, abs=1e-3)
        # the trajectory continues from a candidate: the next x_t is a draw from this step's transition
        for a, b in zip(mine, mine[1:]):
            assert b["timestep"] == a["prev_timestep"]
            assert 0.6 < z2(likelihood, unet, prompt, a["x_t"], a["timestep"], a["prev_timestep"], b["x_t"]) < 1.5


def z2(likelihood, unet, prompt, x_t, t, prev, sample):
    """Mean squared z-score of `sample` under the transition from x_t (guided, as sampled)."""
    t, prev = torch.tensor([t]), torch.tensor([prev])
    cond = likelihood.encode(likelihood.tokenize([prompt]))
    with torch.no_grad():
        mean, std, _ = likelihood.transition(likelihood.guided_output(unet, x_t[None], t, cond), x_t[None], t, prev)
    return float((((sample - mean[0]) / std[0]) ** 2).mean())


def candidate_score(likelihood, unet, prompt, candidate, prev):
    """The Recorder's score of a candidate's decoded x̂0 at its own timestep."""
    from mmalign.modalities.validation import decode_latents

    cond = likelihood.encode(likelihood.tokenize([prompt]))
    t = torch.tensor([prev])
    with torch.no_grad():
        x0 = likelihood.predict_x0(likelihood.guided_output(unet, candidate[None], t, cond), candidate[None], t)
        return float(Recorder().score([prompt], decode_latents(likelihood.vae, x0), t)[0])


def test_d3po_labels_prefer_one_trajectory_at_every_step(tiny):
    unet, likelihood = tiny
    records, counts = sample_d3po_pairs(likelihood, unet, ["a red circle", "a blue square"], ["p-0", "p-1"],
                                        None, {"p-0": 1}, torch.Generator().manual_seed(1))
    assert counts["kept"] == 1 and counts["dropped_unlabelled"] == 1
    assert {r["trajectory"] for r in records} == {"p-0"} and len(records) == 4  # steps 1..4 (step 5: σ = 0)
    for a, b in zip(records, records[1:]):  # each side is one continuing trajectory
        assert torch.equal(b["chosen_x_t"], a["chosen"]) and torch.equal(b["rejected_x_t"], a["rejected"])
        assert a["timestep"] > b["timestep"] and not torch.equal(a["chosen_x_t"], a["rejected_x_t"])
    batch = likelihood.collate(records, "pair")
    torch.testing.assert_close(batch.inputs["x_t"][:4], torch.stack([r["chosen_x_t"] for r in records]))
    torch.testing.assert_close(batch.inputs["x_t"][4:], torch.stack([r["rejected_x_t"] for r in records]))
    out = likelihood.logps(unet, batch)
    assert out.logps.shape == (8,) and torch.isfinite(out.logps).all()


@pytest.mark.parametrize("spo,message", [
    ({"candidates": 1}, "spo.candidates must be >= 2"),
    ({"eta": 0.0}, "spo.eta must be > 0"),
    ({"first_step": 20}, "spo.first_step"),
    ({"labels": "x.jsonl"}, "spo.labels"),
])
def test_bad_spo_settings_name_the_key(spo, message):
    cfg = from_dict(Config, {"modality": "sd_spo", "spo": dict({"prompt_list": ["a"]}, **spo)})
    with pytest.raises(ConfigError, match=message):
        build_modality(cfg)


# -- end to end ----------------------------------------------------------------------------------------
def run(out: Path, *overrides: str) -> int:
    return main(["train", str(ROOT / "configs/tiny/spo.yaml"), f"train.output_dir={out}", "train.progress=false",
                 "train.tensorboard=false", "spo.num_steps=6", "spo.prompts_per_round=4", "spo.round_steps=2",
                 "train.batch_size=4", "train.log_every=1", *overrides])


def test_tiny_spo_run_samples_rounds_trains_and_resumes_exactly(tmp_path, capsys):
    assert run(tmp_path / "a", "train.max_steps=4") == 0
    log = capsys.readouterr().out
    assert "spo round 0:" in log and "spo round 1:" in log
    rounds = sorted((tmp_path / "a" / "rounds").glob("round_*.safetensors"))
    assert [p.name for p in rounds] == ["round_00000.safetensors", "round_00001.safetensors"]
    saved = load_file(str(rounds[0]))
    assert saved["x_t"].shape[1:] == (4, 8, 8) and saved["chosen"].shape == saved["x_t"].shape
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # step 1 is scored before the first update: LoRA B = 0, policy = reference, r = 1, loss = log 2
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    # stop mid-round (step 3 of rounds of 2), resume to 4: round 1 is read back, weights equal run a's
    assert run(tmp_path / "b", "train.max_steps=3") == 0
    capsys.readouterr()
    assert run(tmp_path / "b", "train.max_steps=4", "train.resume=true") == 0
    assert "spo round 1:" not in capsys.readouterr().out  # nothing re-sampled
    a = load_file(str(next((tmp_path / "a" / "final").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "b" / "final").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
