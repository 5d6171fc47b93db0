"""The flow SDE step with log-prob (Flow-GRPO sde, CPS, DanceGRPO; METHODS.md C.1, C.2): the hand
values of METHODS, an independent float64 Gaussian log-density, a = 0 = the Euler ODE step (and
diffusers' FlowMatchEulerDiscreteScheduler.step), the σ = 1 denominator rule; the trajectory
sampler on the tiny SD3 (and FLUX) pipeline: its stored log-probs are what the likelihood computes
(ρ = 1), rows are seeded, windows are ODE outside."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flow_fixtures import save_tiny_flow_pipeline

from mmalign.config import Config, from_dict
from mmalign.modalities import build_modality
from mmalign.modalities.flow import pack_latents
from mmalign.modalities.flow_sde import flow_sde_step, flow_step_logp, unpack_latents
from mmalign.modalities.grpo_source import sample_trajectories, trained_steps

ONE = torch.ones(1, 1, 1, 1)


# -- hand values -------------------------------------------------------------------------------------
def test_flow_grpo_sde_step_hand_values():
    # a = 0.7, σ = 0.5, σ' = 0.4, x = v = 1: std_t = 0.7·sqrt(0.5/0.5) = 0.7;
    # μ = 1 + [1 + 0.49/(2·0.5)·(1 + 0.5)]·(-0.1) = 1 - 0.1735 = 0.8265; s = 0.7·sqrt(0.1) = 0.221359
    mean, std, kl_scale = flow_sde_step(ONE, ONE, 0.5, 0.4, 0.7, "sde")
    assert float(mean) == pytest.approx(0.8265, abs=1e-6)
    assert float(std) == pytest.approx(0.221359, abs=1e-6) and float(kl_scale) == pytest.approx(0.7, abs=1e-7)
    # logp(x' = μ) = -log(0.221359) - log sqrt(2π) = 1.507966 - 0.918939 = 0.589027
    assert float(flow_step_logp(mean, mean, std)) == pytest.approx(0.58903, abs=1e-5)


def test_dance_grpo_step_hand_values():
    # η = 0.3: μ = 1 + [1 + 0.09/(2·0.5)·1.5]·(-0.1) = 0.8865; std = 0.3·sqrt(0.1) = 0.0948683
    mean, std, _ = flow_sde_step(ONE, ONE, 0.5, 0.4, 0.3, "dance")
    assert float(mean) == pytest.approx(0.8865, abs=1e-6) and float(std) == pytest.approx(0.0948683, abs=1e-6)


def test_cps_step_hand_values_and_constant_free_logp():
    # a = 0.8: s = 0.4·sin(0.4π) = 0.380423; x̂0 = 1 - 0.5 = 0.5, x̂1 = 1 + 0.5 = 1.5;
    # μ = 0.6·0.5 + sqrt(0.16 - 0.144721)·1.5 = 0.3 + 0.123607·1.5 = 0.485410
    mean, std, _ = flow_sde_step(ONE, ONE, 0.5, 0.4, 0.8, "cps")
    assert float(std) == pytest.approx(0.380423, abs=1e-6) and float(mean) == pytest.approx(0.485410, abs=1e-6)
    # logp = -mean (x' - μ)²: x' = μ + 0.5 -> -0.25 (no constants, no 1/(2 s²))
    assert float(flow_step_logp(mean + 0.5, mean, std, "cps")) == pytest.approx(-0.25, abs=1e-6)


def test_sigma_one_uses_the_next_sigma_in_the_denominator():
    # σ = 1 would divide by 0: std_t = a·sqrt(1 / (1 - sigmas[1])) = 0.7·sqrt(1/0.1) = 2.213594
    _, std, kl_scale = flow_sde_step(ONE, ONE, 1.0, 0.9, 0.7, "sde", sigma_max=0.9)
    assert float(kl_scale) == pytest.approx(0.7 * math.sqrt(10), abs=1e-5)
    assert float(std) == pytest.approx(0.7 * math.sqrt(10) * math.sqrt(0.1), abs=1e-5)


def test_logp_equals_an_independent_float64_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma, sigma_next, a = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.45, 0.1]), torch.tensor([0.7, 0.5, 1.0])
    for sde_type in ("sde", "dance"):
        mean, std, _ = flow_sde_step(x, v, sigma, sigma_next, a, sde_type)
        x_next = mean + std.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
        got = flow_step_logp(x_next, mean, std, sde_type)
        for i in range(3):  # numpy float64 from the formulas, not from the code under test
            xs, vs, s, sn, ai = x[i].double().numpy(), v[i].double().numpy(), float(sigma[i]), float(sigma_next[i]), float(a[i])
            c = ai * math.sqrt(s / (1 - s)) if sde_type == "sde" else ai
            mu = xs + (vs + c**2 / (2 * s) * (xs + (1 - s) * vs)) * (sn - s)
            sd = c * math.sqrt(s - sn)
            dens = -((x_next[i].double().numpy() - mu) ** 2) / (2 * sd**2) - math.log(sd) - 0.5 * math.log(2 * math.pi)
            assert float(got[i]) == pytest.approx(float(np.mean(dens)), abs=2e-5)


@pytest.mark.parametrize("sde_type", ["sde", "cps", "dance"])
def test_zero_noise_is_the_euler_step(sde_type):
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    mean, std, _ = flow_sde_step(x, v, 0.7, 0.55, 0.0, sde_type)
    torch.testing.assert_close(mean, x + (0.55 - 0.7) * v, rtol=0, atol=1e-6)
    assert float(std.abs().max()) == 0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(2)
    s = scheduler.sigmas
    ode, _, _ = flow_sde_step(x, v, float(s[2]), float(s[3]), 0.0, sde_type)
    torch.testing.assert_close(ode, scheduler.step(v, scheduler.timesteps[2], x, return_dict=False)[0], rtol=0, atol=1e-6)


def test_unpack_inverts_flux_packing():
    x = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(unpack_latents(pack_latents(x), (4, 6, 8)), x, rtol=0, atol=0)


# -- the sampler on the tiny SD3 / FLUX pipelines ----------------------------------------------------------
@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_flow")
    return {"sd3": save_tiny_flow_pipeline(root / "sd3"), "flux": save_tiny_flow_pipeline(root / "flux", flux=True)}


def build(path, modality="sd3_grpo", **grpo):
    settings = dict({"prompt_list": ["a red circle"], "num_steps": 4, "scorer": ["redness"], "guidance": 2.0}, **grpo)
    cfg = from_dict(Config, {"modality": modality, "model": {"path": str(path)}, "diffusion": {"resolution": 16},
                             "grpo": settings})
    return build_modality(cfg)[:2]


def records(steps, prompts):
    return [dict(s, prompt=p, advantage=1.0) for row, p in zip(steps, prompts) for s in row]


@pytest.mark.parametrize("name,modality,sde_type", [("sd3", "sd3_grpo", "sde"), ("sd3", "sd3_grpo", "cps"),
                                                    ("sd3", "sd3_grpo", "dance"), ("flux", "flux_grpo", "sde")])
def test_sampled_logps_are_what_the_likelihood_computes(pipelines, name, modality, sde_type):
    model, lik = build(pipelines[name], modality, sde_type=sde_type, noise_level=0.8 if sde_type == "cps" else 0.7)
    model.eval()
    prompts = ["a red circle", "a blue square"]
    every = [list(range(4))] * 2
    steps, final = sample_trajectories(lik, model, prompts, [11, 12], every, [[0, 1, 2]] * 2, lik.settings.noise_level)
    assert [[s["step"] for s in row] for row in steps] == [[0, 1, 2], [0, 1, 2]] and final.shape == (2, 4, 8, 8)
    batch = lik.collate(records(steps, prompts), "step")
    with torch.no_grad():
        out = lik.logps(model, batch)
    torch.testing.assert_close(out.logps, batch.old_logps, rtol=0, atol=2e-5)  # ρ = 1 before any update
    # a row is a function of its seed alone: the same seed in another batch gives the same trajectory
    again, _ = sample_trajectories(lik, model, prompts[1:], [12], every[:1], [[0, 1, 2]], lik.settings.noise_level)
    torch.testing.assert_close(again[0][2]["completion"], steps[1][2]["completion"], rtol=0, atol=1e-5)


def test_window_steps_are_sde_and_the_rest_ode(pipelines):
    model, lik = build(pipelines["sd3"], window_size=2, window_range=[0, 4])
    model.eval()
    settings = SimpleNamespace(window_size=2, window_range=[0, 4], timestep_fraction=0.99, timestep_selection="first")
    sde, train = trained_steps(4, settings, torch.Generator().manual_seed(3))
    assert sde == train and len(sde) == 2 and sde[1] == sde[0] + 1 and 0 <= sde[0] <= 2
    steps, _ = sample_trajectories(lik, model, ["a red circle"], [5], [sde], [train], 0.7)
    assert [s["step"] for s in steps[0]] == sde and all(s["noise_level"] == 0.7 for s in steps[0])
    # all-ODE sampling (no SDE step) from the same seed is the Euler ODE: deterministic, no records
    ode_steps, ode_final = sample_trajectories(lik, model, ["a red circle"], [5], [[]], [[0, 1]], 0.7)
    assert ode_steps == [[]]
    x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(5))[None]
    cond = lik.encode(lik.tokenize(["a red circle"]))
    with torch.no_grad():
        for t, t_next in lik.steps():
            x = x + (t_next - t) * lik.guided(model, x, torch.tensor([t]), cond)
    torch.testing.assert_close(ode_final, x, rtol=0, atol=1e-5)
