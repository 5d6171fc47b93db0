"""GRPO (`loss.name: grpo`; METHODS.md C.1, C.2): group advantages and the clipped loss on
hand-computed values for 2 prompts x 3 samples, ρ = 1 before the first update, the clipped branch
passing no gradient, KL 0 when policy == reference, GDPO-style per-reward normalisation against
numpy, config checks, and tiny `mmalign train` runs (SD3 flow, SD UNet) with an exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flow_fixtures import save_tiny_flow_pipeline
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import Config, ConfigError, from_dict
from mmalign.losses import get_loss
from mmalign.losses_grpo import group_advantages, grpo_loss, kl_term
from mmalign.modalities import build_modality
from mmalign.types import LogpOutput

ROOT = Path(__file__).resolve().parents[1]
REWARDS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 7.0]])  # 2 prompts x 3 samples


# -- advantages --------------------------------------------------------------------------------------
def test_group_advantages_hand_computed():
    # per group: group 0 mean 2, population std sqrt(2/3) = 0.816497 -> ±1/0.816597 = ±1.224595;
    # group 1 mean 5, std sqrt(6/3) = 1.414214 -> [-1, -1, 2]/1.414314
    per_group = group_advantages(REWARDS, global_std=False)
    torch.testing.assert_close(per_group, torch.tensor([[-1.224595, 0.0, 1.224595], [-0.707057, -0.707057, 1.414114]]),
                               rtol=0, atol=1e-5)
    # global std (flow_grpo's shipped configs): all six rewards, mean 3.5, var 21.5/6 -> std 1.892969
    glob = group_advantages(REWARDS, global_std=True)
    torch.testing.assert_close(glob, torch.tensor([[-0.528243, 0.0, 0.528243], [-0.528243, -0.528243, 1.056485]]),
                               rtol=0, atol=1e-5)
    # DanceGRPO: torch's unbiased std per group + 1e-8: group 0 std 1 -> ±1; group 1 std sqrt(3) -> [-1,-1,2]/1.732051
    torch.testing.assert_close(group_advantages(REWARDS, global_std=False, eps=1e-8, ddof=1),
                               torch.tensor([[-1.0, 0.0, 1.0], [-0.577350, -0.577350, 1.154701]]), rtol=0, atol=1e-5)
    # a group of equal rewards gives 0 (the std floor 1e-4 keeps it finite)
    assert group_advantages(torch.tensor([[3.0, 3.0, 3.0]]), global_std=False).abs().max() == 0


def test_weighted_sum_and_per_reward_normalisation_against_numpy():
    second = torch.tensor([[10.0, 0.0, 5.0], [1.0, 2.0, 2.0]])
    rewards = torch.stack([REWARDS, second])
    # flow_grpo: the weighted sum is normalised
    torch.testing.assert_close(group_advantages(rewards, [1.0, 0.5]), group_advantages(REWARDS + 0.5 * second),
                               rtol=0, atol=1e-6)
    # GDPO-style: each reward normalised in its group, weighted sum, then normalised over the round
    r = rewards.double().numpy()
    parts = [(rk - rk.mean(1, keepdims=True)) / (rk.std(1, keepdims=True) + 1e-4) for rk in r]
    a = 1.0 * parts[0] + 0.5 * parts[1]
    expected = (a - a.mean()) / (a.std() + 1e-4)
    got = group_advantages(rewards, [1.0, 0.5], global_std=False, per_reward=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)


# -- the loss ------------------------------------------------------------------------------------------
def step_output(logps, means=None, scale=None):
    transition = None if means is None else (means, scale)
    return LogpOutput(logps=logps, transition=transition)


def test_grpo_loss_hand_computed_with_clip_and_kl():
    # ε = 0.1, old log-probs 0; A = [1, -2, 6 -> clipped to 5]
    # item 0: ρ = 1.2, A = 1: max(-1.2, -1.1) = -1.1 (clipped); item 1: ρ = 0.5, A = -2:
    # max(1.0, 1.8) = 1.8 (clipped at 0.9); item 2: ρ = 1, A = 5: -5
    logps = torch.log(torch.tensor([1.2, 0.5, 1.0]))
    advantages, old = torch.tensor([1.0, -2.0, 6.0]), torch.zeros(3)
    policy_means = torch.zeros(3, 1, 2, 2)
    ref_means = torch.tensor([0.0, 0.1, 0.2]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    scale = torch.tensor([0.5, 0.5, 1.0])
    # KL = mean(Δμ²)/(2 s²) = [0, 0.01/0.5, 0.04/2] = [0, 0.02, 0.02]
    torch.testing.assert_close(kl_term(policy_means, ref_means, scale), torch.tensor([0.0, 0.02, 0.02]))
    loss = grpo_loss(step_output(logps, policy_means, scale), step_output(logps, ref_means, scale),
                     advantages=advantages, old_logps=old, clip=0.1, kl_beta=0.5, adv_clip_max=5.0)
    torch.testing.assert_close(loss, torch.tensor([-1.1, 1.8 + 0.01, -5.0 + 0.01]), rtol=0, atol=1e-6)
    assert get_loss("grpo").kind == "step" and get_loss("grpo").fields == ("advantages", "old_logps")


def test_ratio_one_gives_minus_advantage_and_the_clipped_branch_no_gradient():
    advantages = group_advantages(REWARDS).flatten()
    old = torch.tensor([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2])
    logps = old.clone().requires_grad_(True)  # policy == old (first update): ρ = 1
    loss = grpo_loss(step_output(logps), step_output(logps.detach()), advantages=advantages, old_logps=old,
                     clip=1e-4, kl_beta=0.0, adv_clip_max=5.0)
    torch.testing.assert_close(loss, -advantages, rtol=0, atol=1e-7)
    loss.sum().backward()  # d/dlogp of -A ρ at ρ = 1 is -A
    torch.testing.assert_close(logps.grad, -advantages, rtol=0, atol=1e-7)
    # ρ = 1.5 > 1 + ε with A > 0: the clipped (constant) branch wins, no gradient; with A < 0 it does not
    moved = (old + math.log(1.5)).requires_grad_(True)
    grpo_loss(step_output(moved), step_output(moved.detach()), advantages=advantages, old_logps=old,
              clip=0.2, kl_beta=0.0, adv_clip_max=5.0).sum().backward()
    assert all(float(g) == 0 for g, a in zip(moved.grad, advantages) if a > 0)
    assert all(float(g) == pytest.approx(-float(a) * 1.5, abs=1e-6) for g, a in zip(moved.grad, advantages) if a < 0)


def test_kl_is_zero_when_policy_equals_reference():
    means = torch.randn(4, 4, 8, 8)
    out = step_output(torch.zeros(4), means, torch.full((4,), 0.3))
    assert kl_term(means, means.clone(), torch.full((4,), 0.3)).abs().max() == 0
    loss = grpo_loss(out, step_output(torch.zeros(4), means.clone(), torch.full((4,), 0.3)),
                     advantages=torch.ones(4), old_logps=torch.zeros(4), clip=0.1, kl_beta=1.0, adv_clip_max=5.0)
    torch.testing.assert_close(loss, -torch.ones(4))


# -- config checks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("grpo,message", [
    ({"group_size": 1}, "grpo.group_size"),
    ({"noise_level": 0.0}, "grpo.noise_level"),
    ({"scorer": []}, "grpo.scorer"),
    ({"scorer_weights": [1.0, 2.0]}, "grpo.scorer_weights"),
    ({"scorer": ["pickscore=/m/PickScore_v1:0.5"]}, "grpo.scorer_weights"),
    ({"window_size": 3, "window_range": [0, 2]}, "grpo.window_range"),
    ({"timestep_fraction": 0.05}, "grpo.timestep_fraction"),
    ({"std_ddof": 2}, "grpo.std_ddof"),
])
def test_bad_grpo_settings_name_the_key(grpo, message):
    cfg = from_dict(Config, {"modality": "sd3_grpo", "grpo": dict({"prompt_list": ["a"], "scorer": ["redness"]},
                                                                  **grpo)})
    with pytest.raises(ConfigError, match=message):
        build_modality(cfg)


def test_unknown_sde_type_and_loss_keys_are_refused(tmp_path):
    from mmalign.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("modality: sd3_grpo\ngrpo: {sde_type: sdee}\n")
    with pytest.raises(ConfigError, match="grpo.sde_type"):
        load_config(path)
    path.write_text("modality: sd3\nloss: {name: dpo, kl_beta: 0.1}\n")
    with pytest.raises(ConfigError, match="kl_beta"):
        load_config(path)


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return save_tiny_flow_pipeline(tmp_path_factory.mktemp("grpo_sd3") / "pipeline")


def run_flow(pipeline: Path, out: Path, *overrides: str) -> int:
    # one round = 2 prompts x 3 trajectories x int(4 x 0.99) = 3 steps = 18 transitions = 2 steps of 9
    return main(["train", str(ROOT / "configs/tiny/flow_grpo.yaml"), f"model.path={pipeline}",
                 f"train.output_dir={out}", "train.progress=false", "train.tensorboard=false",
                 "grpo.prompts_per_round=2", "grpo.group_size=3", "grpo.num_steps=4", "train.batch_size=9",
                 "train.log_every=1", "optim.lr=1e-2", *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_flow_grpo_trains_and_resumes_exactly(sd3, tmp_path, capsys):
    assert run_flow(sd3, tmp_path / "a", "train.max_steps=4") == 0
    log = capsys.readouterr().out
    assert "grpo round 0: 6 trajectories" in log and "grpo round 1:" in log
    saved = load_file(str(tmp_path / "a" / "rounds" / "grpo_00000.safetensors"))
    assert saved["x_t"].shape == (18, 4, 8, 8) and sorted(set(saved["step"].tolist())) == [0, 1, 2]
    m = metrics(tmp_path / "a")
    # step 1 is scored before any update with LoRA B = 0: policy == old == reference
    assert m[0]["grpo/ratio"] == pytest.approx(1.0, abs=1e-5) and m[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-10)
    assert m[0]["loss"] == pytest.approx(-m[0]["grpo/advantage"], abs=1e-5)
    assert m[1]["grpo/kl"] > 0 and all(math.isfinite(x["loss"]) for x in m)
    # stop mid-round (after step 3 of rounds of 2), resume to 4: round 1 is read back, same weights
    assert run_flow(sd3, tmp_path / "b", "train.max_steps=3") == 0
    capsys.readouterr()
    assert run_flow(sd3, tmp_path / "b", "train.max_steps=4", "train.resume=true") == 0
    assert "grpo round 1:" not in capsys.readouterr().out
    a = load_file(str(next((tmp_path / "a" / "final").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "b" / "final").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_unet_grpo_run(tmp_path, capsys):
    out = tmp_path / "sd"
    assert main(["train", str(ROOT / "configs/tiny/sd_grpo.yaml"), f"train.output_dir={out}", "train.progress=false",
                 "train.tensorboard=false", "grpo.prompts_per_round=2", "grpo.group_size=3", "grpo.num_steps=4",
                 "train.batch_size=12", "train.max_steps=2"]) == 0
    assert "grpo round 0: 6 trajectories" in capsys.readouterr().out
    saved = load_file(str(out / "rounds" / "grpo_00000.safetensors"))
    assert saved["t"].tolist()[0] > saved["t_next"].tolist()[0]  # DDIM timesteps t -> t - T/S
    m = metrics(out)
    assert m[0]["grpo/ratio"] == pytest.approx(1.0, abs=1e-5) and m[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-10)
    assert m[1]["grpo/kl"] > 0
