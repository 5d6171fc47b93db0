"""DiffusionNFT (`loss.name: nft`, METHODS.md C.3): r(A) and the group advantage by hand, the loss
against an independent float64 formula and its β / equal-policy properties, the old policy's η_k
table and swap, the UNet -> flow-convention conversion, the `rewards` strategy's records, and the
tiny flow (SD3-shaped, LoRA) and SD UNet (full) runs, with resume == uninterrupted."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import needs_torchrun, torchrun
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import ConfigError, load_config
from mmalign.losses_nft import nft_advantages, nft_loss, optimality_weights
from mmalign.online.rounds import record_kind, select_records
from mmalign.train.old_policy import OldPolicy, old_decay

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "configs/tiny/flow_nft.yaml"
SD = ROOT / "configs/tiny/sd_nft.yaml"
QUIET = ["train.progress=false", "train.tensorboard=false"]


# -- advantages and r ------------------------------------------------------------------------
def test_optimality_weights_are_the_methods_values():
    a = torch.tensor([-5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    assert optimality_weights(a, 5.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_group_advantages_by_hand_global_and_group_std():
    rewards, groups = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1])
    glob = nft_advantages(rewards, groups, True, 5.0)  # means 1.5, 3.5; std of all = sqrt(1.25)
    assert torch.allclose(glob, torch.tensor([-0.5, 0.5, -0.5, 0.5], dtype=torch.float64) / (math.sqrt(1.25) + 1e-4))
    group = nft_advantages(rewards, groups, False, 5.0)  # each group's std 0.5
    assert torch.allclose(group, torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64) * 0.5 / 0.5001)
    clipped = nft_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), False, 1.0)
    assert clipped.max().item() == 1.0  # (1 - 0.25) / (0.433 + 1e-4) = 1.73 clipped to A_max 1


def test_nft_and_grpo_share_one_group_normalisation():
    """NFT's ragged groups (any sizes, any order) are GRPO's dense (P, G) formula, then the clip."""
    from mmalign.losses_grpo import group_advantages

    dense = torch.tensor([[1.0, 4.0, 2.0], [0.5, 0.5, 3.0]])
    order = torch.tensor([4, 0, 5, 2, 1, 3])  # the items shuffled: groups need not be contiguous
    for global_std in (True, False):
        got = nft_advantages(dense.flatten()[order], torch.tensor([0, 0, 0, 1, 1, 1])[order], global_std, 1.0)
        want = group_advantages(dense, global_std=global_std).double().flatten()[order].clamp(-1.0, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert got.abs().max() == 1.0  # group std: (3 - 4/3) / 1.18 = 1.41 clipped to A_max 1


def test_online_adv_clip_max_moved_to_the_loss_section():
    with pytest.raises(ConfigError, match="^config key 'online.adv_clip_max' moved to 'loss.adv_clip_max'$"):
        load_config(ROOT / "configs/tiny/flow_nft.yaml", ["online.adv_clip_max=2.0"])
    assert load_config(ROOT / "configs/tiny/flow_nft.yaml", ["loss.adv_clip_max=2.0"]).loss.adv_clip_max == 2.0


def test_online_global_std_moved_to_the_grpo_section():
    """One advantage-normalisation knob: online.global_std is refused, grpo.global_std sets NFT's
    rewards (rewards 1, 3 in one group, 5 alone: group std 1, round std sqrt(8/3))."""
    with pytest.raises(ConfigError, match="^config key 'online.global_std' moved to 'grpo.global_std'$"):
        load_config(ROOT / "configs/tiny/flow_nft.yaml", ["online.global_std=false"])
    rows = [{"id": f"s{i}", "prompt_index": i // 2, "prompt": f"p{i // 2}", "seed": i, "kind": "text",
             "text": f"t{i}", "score": s} for i, s in enumerate([1.0, 3.0, 5.0])]
    for global_std, std in ((True, math.sqrt(8 / 3)), (False, 1.0)):
        cfg = load_config(ROOT / "configs/tiny/flow_nft.yaml", [f"grpo.global_std={str(global_std).lower()}"])
        assert cfg.grpo.global_std is global_std
        records, _ = select_records(rows, cfg.online, cfg.loss.adv_clip_max, cfg.grpo.global_std)
        want = [-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0]
        assert [r["advantage"] for r in records] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert load_config(ROOT / "configs/tiny/flow_nft.yaml").grpo.global_std is True  # the shipped setting


def test_rewards_strategy_gives_one_rewarded_record_per_scored_sample():
    rows = [{"id": f"s{i}", "prompt_index": i // 2, "prompt": f"p{i // 2}", "seed": i, "kind": "text",
             "text": f"t{i}", "score": s} for i, s in enumerate([1.0, 3.0, 5.0, None])]
    records, selection = select_records(rows, SimpleNamespace(strategy="rewards"), 0.5, False)
    assert record_kind("rewards") == "rewarded" and [r["completion"] for r in records] == ["t0", "t1", "t2"]
    # group p0: mean 2, std 1 -> A = -1/1.0001, +1/1.0001 clipped to ±0.5 -> r = 0, 1; p1 alone: A = 0 -> r 0.5
    assert [r["advantage"] for r in records] == [-0.5, 0.5, 0.0]
    assert [r["optimality"] for r in records] == [0.0, 1.0, 0.5]
    assert selection.counts["unscored"] == 1 and "3 rewarded samples" in selection.summary()


# -- the loss ----------------------------------------------------------------------------------
def reference_nft(x_t, t, x0, v_th, v_old, r, v_ref, beta, a_max, kl_beta):
    """The C.3 formula, written out in float64 per sample."""
    out = []
    for i in range(x_t.shape[0]):
        xt, ti, target = x_t[i].double(), float(t[i]), x0[i].double()
        vp = beta * v_th[i].double() + (1 - beta) * v_old[i].double()
        vn = (1 + beta) * v_old[i].double() - beta * v_th[i].double()
        terms = []
        for v in (vp, vn):
            err = xt - ti * v - target
            terms.append((err ** 2).mean() / max(err.abs().mean().item(), 1e-5))
        kl = ((v_th[i].double() - v_ref[i].double()) ** 2).mean()
        out.append(a_max * (float(r[i]) * terms[0] + (1 - float(r[i])) * terms[1]) / beta + kl_beta * kl)
    return torch.stack(out)


def random_inputs(seed=0, n=3, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)
    t = torch.tensor([0.9, 0.5, 0.2])[:n]
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_th, v_old, v_ref = (eps - x0 + 0.3 * torch.randn(n, *shape, generator=g) for _ in range(3))
    return x_t, t, x0, v_th, v_old, v_ref


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_equals_the_float64_formula(beta):
    x_t, t, x0, v_th, v_old, v_ref = random_inputs()
    r = torch.tensor([0.0, 0.3, 1.0])
    got = nft_loss(x_t.double(), t.double(), x0.double(), v_th.double(), v_old.double(), r, v_ref.double(),
                   beta=beta, adv_clip_max=5.0, kl_beta=1e-4)
    want = reference_nft(x_t, t, x0, v_th, v_old, r, v_ref, beta, 5.0, 1e-4)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_equal_policies_give_the_old_loss_whatever_r():
    """v_θ == v_old: v⁺ = v⁻ = v_old, so L = A_max·L_old/β for every r."""
    x_t, t, x0, v, _, _ = random_inputs(1)
    err = x_t - t.view(-1, 1, 1, 1) * v - x0
    l_old = (err ** 2).mean((1, 2, 3)) / err.abs().mean((1, 2, 3))
    for r in (0.0, 0.25, 1.0):
        got = nft_loss(x_t, t, x0, v, v.clone(), torch.full((3,), r), beta=0.5, adv_clip_max=5.0, kl_beta=0.0)
        assert got.dtype == torch.float64 and torch.allclose(got.float(), 5.0 * l_old / 0.5, rtol=1e-5)


def test_gradient_pulls_towards_the_target_for_r_1_and_away_for_r_0():
    """At v_θ = v_old, r = 1 gives the gradient of the positive term (descent moves x̂0 to x0),
    r = 0 the negative one (v⁻ moves opposite to v_θ): the two gradients have opposite signs."""
    x_t, t, x0, v, _, _ = random_inputs(2)
    grads = []
    for r in (1.0, 0.0):
        v_th = v.clone().requires_grad_(True)
        nft_loss(x_t, t, x0, v_th, v.clone(), torch.full((3,), r), beta=1.0, adv_clip_max=5.0,
                 kl_beta=0.0).sum().backward()
        grads.append(v_th.grad)
    assert torch.allclose(grads[0], -grads[1], rtol=1e-5)
    err = (x_t - t.view(-1, 1, 1, 1) * v - x0)  # positive term: d/dv of err² is -2t·err, up to the weight
    assert (torch.sign(grads[0]) == torch.sign(-t.view(-1, 1, 1, 1) * err)).all()


def test_kl_needs_the_reference():
    x_t, t, x0, v_th, v_old, _ = random_inputs()
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(x_t, t, x0, v_th, v_old, torch.zeros(3), beta=1.0, adv_clip_max=5.0, kl_beta=1.0)


# -- the old policy ------------------------------------------------------------------------------
def test_decay_schedule_values():
    assert [old_decay(k, 0) for k in (0, 100, 10_000)] == [0.0, 0.0, 0.0]
    assert [old_decay(k, 1) for k in (0, 100, 499, 500, 900)] == pytest.approx([0.0, 0.1, 0.499, 0.5, 0.5])
    assert [old_decay(k, 2) for k in (50, 75, 175, 1000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])


def test_old_policy_update_and_swap():
    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)  # frozen weights are not part of θ_old
    old = OldPolicy(model, decay_type=1)
    theta0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert old.update(model, 100) == pytest.approx(0.1)
    assert torch.allclose(old.weights["weight"], 0.1 * theta0 + 0.9 * (theta0 + 1.0))
    with old.swapped(model):
        assert torch.equal(model.weight, old.weights["weight"])
    assert torch.equal(model.weight, theta0 + 1.0) and set(old.state_dict()) == {"weight"}


# -- UNet predictions in the flow convention ------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unet_flow_view_recovers_x0_and_the_flow_noisy_input(prediction_type):
    from diffusers import DDPMScheduler

    from mmalign.modalities.diffusion import ElboObjective, prediction_target

    objective = ElboObjective(DDPMScheduler(num_train_timesteps=1000), prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    values = {"timesteps": torch.tensor([999, 250])}
    noisy, target = objective.noisy_and_target(x0, eps, values)
    assert torch.equal(target, prediction_target(objective.scheduler, prediction_type, x0, eps, values["timesteps"]))
    x_t, t, v, latents = objective.flow_view(noisy, x0, target, values)  # a perfect prediction
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - tt) * x0 + tt * eps, atol=1e-5)
    assert torch.allclose(v, eps - x0, atol=1e-4) and torch.allclose(x_t - tt * v, x0, atol=1e-5)
    assert objective.schedule(4).tolist() == [750, 500, 250, 0]


def test_flow_schedule_is_the_shifted_linspace():
    from mmalign.modalities.flow import FlowObjective

    objective = FlowObjective(SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)), 3.0)
    assert objective.schedule(2).tolist() == pytest.approx([1.0, 0.75])


# -- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["online.strategy=best_worst"], "online.strategy: rewards"),
    (["loss.name=dpo", "loss.kl_beta=0.0"], "only loss nft trains"),
    (["nft.decay_type=3"], "nft.decay_type"),
    (["nft.timestep_fraction=0.1"], "at least one training time"),
])
def test_bad_nft_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SD, overrides)


# -- tiny runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    from flow_fixtures import save_tiny_flow_pipeline

    return save_tiny_flow_pipeline(tmp_path_factory.mktemp("nft") / "sd3")


def flow_run(out: Path, pipeline: Path, *overrides: str) -> int:
    return main(["train", str(FLOW), f"model.path={pipeline}", f"train.output_dir={out}", "train.batch_size=2",
                 "online.group_size=2", "online.sampling={num_inference_steps: 3, guidance_scale: 1.0}",
                 *QUIET, *overrides])


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((out / "final").glob("*.safetensors"))))


def test_tiny_flow_nft_trains_and_resumes_exactly(tmp_path, sd3_pipeline, capsys):
    """4 steps = 2 rounds; killed after step 3 (mid round 1, θ_old already decayed once), resumed:
    the resumed θ_old comes from the checkpoint (a fresh copy would be θ_0), so the weights are equal."""
    assert flow_run(tmp_path / "a", sd3_pipeline, "train.max_steps=4") == 0
    assert "online round 1: 4 rewarded samples" in capsys.readouterr().out
    records = [json.loads(x) for x in (tmp_path / "a/rounds/round_00000/records.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(0 <= r["optimality"] <= 1 for r in records)
    metrics = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[0]["nft/old_deviate"] == 0.0
    assert flow_run(tmp_path / "b", sd3_pipeline, "train.max_steps=3") == 0
    state = torch.load(next((tmp_path / "b").glob("checkpoints/step_*/trainer.pt")), weights_only=True)
    assert state["nft_old"] and all("lora" in k for k in state["nft_old"])
    assert flow_run(tmp_path / "b", sd3_pipeline, "train.max_steps=4", "train.resume=true") == 0
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained


def test_tiny_sd_unet_nft_runs_two_steps(tmp_path, capsys):
    out = tmp_path / "sd"
    assert main(["train", str(SD), f"train.output_dir={out}", "train.max_steps=2", "online.group_size=2",
                 "train.batch_size=2", "online.sampling={num_inference_steps: 2, guidance_scale: 1.0}", *QUIET]) == 0
    assert "online round 0: 4 rewarded samples" in capsys.readouterr().out
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert metrics[0]["nft/kl"] == 0.0 and metrics[1]["nft/kl"] > 0.0  # the frozen copy is θ_0


@needs_torchrun
def test_two_processes_equal_one(tmp_path, sd3_pipeline):
    """1 process x batch 4 == 2 processes x batch 2, a round per step (round 1 is sampled by θ_old
    after its first decay): every process samples the same round and each record's times and noises
    come from (step, row), so only float rounding differs (a process-dependent draw would give
    differences of the weights' own size)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["train.max_steps=2", "online.round_steps=1", "online.group_size=2", "train.save_every=1",
              "online.sampling={num_inference_steps: 3, guidance_scale: 1.0}", f"model.path={sd3_pipeline}", *QUIET]
    assert main(["train", str(FLOW), f"train.output_dir={one}", "train.batch_size=4", *common]) == 0
    run = torchrun(["train", str(FLOW), f"train.output_dir={two}", "train.batch_size=2", *common])
    assert run.returncode == 0, run.stderr[-3000:]
    a = load_file(str(one / "checkpoints" / "step_00000002" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_00000002" / "model.safetensors"))
    moved = [k for k in a if "lora_B" in k and a[k].abs().max() > 0]
    assert moved and a.keys() == b.keys()
    scale = max(float(a[k].abs().max()) for k in moved)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-3 * scale
