"""The step-aware transition likelihood (mmalign/modalities/step.py): agreement with diffusers'
DDIM / DDPM `step()` under fixed noise, the Gaussian log-density against an independent closed
form, classifier-free guidance, and SDXL conditioning on the tiny pipelines."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusion_fixtures import save_tiny_pipeline, tiny_scheduler

from mmalign.config import Config, from_dict
from mmalign.modalities import build_modality
from mmalign.modalities.step import StepLikelihood


def settings(sampler="ddim", eta=1.0, guidance=1.0, num_steps=20):
    return SimpleNamespace(sampler=sampler, eta=eta, guidance=guidance, num_steps=num_steps)


def bare_likelihood(sampler="ddim", eta=1.0, prediction_type="epsilon", **scheduler_overrides):
    """A StepLikelihood around the tiny scaled_linear DDPM config (no text encoders needed)."""
    config = dict(tiny_scheduler(prediction_type).config, **scheduler_overrides)  # DDIM keys kept too
    base = SimpleNamespace(scheduler=SimpleNamespace(config=config), prediction_type=prediction_type)
    return StepLikelihood(base, settings(sampler, eta))


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of the scaled_linear schedule (β from 0.00085 to 0.012 over 1000 steps), by hand, float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# -- exact agreement with the schedulers' step() ---------------------------------------------------
@pytest.mark.parametrize("prediction_type,clip,alpha_one", [("epsilon", True, True), ("epsilon", False, False),
                                                             ("v_prediction", False, False)])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_mean_and_std_reproduce_diffusers_step_with_fixed_noise(prediction_type, clip, alpha_one, eta):
    # SD1.5's own config: steps_offset 1, set_alpha_to_one false (the last step then keeps σ > 0)
    likelihood = bare_likelihood("ddim", eta, prediction_type, clip_sample=clip, set_alpha_to_one=alpha_one,
                                 steps_offset=0 if alpha_one else 1)
    reference = DDIMScheduler.from_config(likelihood.scheduler.config)
    reference.set_timesteps(20)
    ts, prevs = likelihood.timesteps()
    assert ts.tolist() == reference.timesteps.tolist() and prevs[-1] < 0
    gen = torch.Generator().manual_seed(0)
    for t, prev in [(ts[0], prevs[0]), (ts[7], prevs[7]), (ts[-1], prevs[-1])]:
        x_t = torch.randn(2, 4, 8, 8, generator=gen) * 1.5
        output = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        expected = reference.step(output, int(t), x_t, eta=eta, variance_noise=noise).prev_sample
        mean, std, _ = likelihood.transition(output, x_t, torch.full((2,), int(t)), torch.full((2,), int(prev)))
        torch.testing.assert_close(mean + std.view(-1, 1, 1, 1) * noise, expected, rtol=1e-5, atol=1e-5)
    # set_alpha_to_one: the last DDIM step is deterministic (σ = 0), otherwise it is not
    assert (float(std[0]) == 0.0) == alpha_one


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_mean_and_std_reproduce_diffusers_step(variance_type):
    likelihood = bare_likelihood("ddpm", variance_type=variance_type)
    reference = DDPMScheduler.from_config(likelihood.scheduler.config)
    reference.set_timesteps(20)
    assert reference.config.variance_type == variance_type
    ts, prevs = likelihood.timesteps()
    assert prevs[:-1].tolist() == ts[1:].tolist() and prevs[-1] == -1
    gen = torch.Generator().manual_seed(1)
    for i in (0, 9, 19):
        x_t, output = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        expected = reference.step(output, int(ts[i]), x_t, generator=torch.Generator().manual_seed(5)).prev_sample
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # what step() drew
        mean, std, _ = likelihood.transition(output, x_t, torch.full((2,), int(ts[i])), torch.full((2,), int(prevs[i])))
        torch.testing.assert_close(mean + std.view(-1, 1, 1, 1) * noise, expected, rtol=1e-5, atol=1e-5)
    assert float(std[0]) == 0.0  # t = 0: no noise


# -- the log-density against an independent closed form ---------------------------------------------
class FixedOutput(torch.nn.Module):
    """A 'UNet' that returns a stored output whatever the input (guidance 1: no CFG)."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.output = output

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        return (self.output + 0 * self.weight,)


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl"), sdxl=True, seed=1)


def step_likelihood(pipeline, modality="sd_spo", **spo):
    cfg = from_dict(Config, {"modality": modality, "model": {"path": str(pipeline)}, "diffusion": {"resolution": 16},
                             "spo": dict({"prompt_list": ["a red circle"]}, **spo)})
    return build_modality(cfg)[:2]


def test_ddim_logp_equals_the_closed_form_gaussian_mean_over_dims(sd_pipeline):
    _, likelihood = step_likelihood(sd_pipeline, guidance=1.0, eta=1.0)
    gen = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    chosen, rejected = torch.randn(4, 8, 8, generator=gen), torch.randn(4, 8, 8, generator=gen)
    t, prev = 651, 601  # DDIM 20 steps: T/S = 50
    records = [{"prompt": "a red circle", "timestep": t, "prev_timestep": prev, "x_t": x_t[0],
                "chosen": chosen, "rejected": rejected}]
    batch = likelihood.collate(records, "pair")
    out = likelihood.logps(FixedOutput(eps[:1].repeat(2, 1, 1, 1)), batch)
    # by hand, float64: x̂0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t clipped to ±1 (the config's clip_sample),
    # σ² = (1-ᾱ_p)/(1-ᾱ_t)(1-ᾱ_t/ᾱ_p), μ = √ᾱ_p x̂0 + √(1-ᾱ_p-σ²) ε
    ac = scaled_linear_alphas_cumprod()
    a_t, a_p = ac[t], ac[prev]
    x, e = x_t[0].double(), eps[0].double()
    x0 = ((x - (1 - a_t).sqrt() * e) / a_t.sqrt()).clamp(-1, 1)
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    mu = a_p.sqrt() * x0 + (1 - a_p - var).sqrt() * e
    expected = [float((-(y.double() - mu) ** 2 / (2 * var) - 0.5 * torch.log(2 * math.pi * var)).mean())
                for y in (chosen, rejected)]
    torch.testing.assert_close(out.logps.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert out.logps.shape == (2,) and float(out.diagnostics["step_std"][0]) == pytest.approx(float(var.sqrt()), rel=1e-5)
    # the sample drawn at exactly μ has the highest density: -log σ - ½ log 2π
    at_mean = dict(records[0], chosen=mu.float())
    top = likelihood.logps(FixedOutput(eps[:1].repeat(2, 1, 1, 1)), likelihood.collate([at_mean], "pair")).logps[0]
    assert float(top.detach()) == pytest.approx(float(-0.5 * torch.log(2 * math.pi * var)), abs=1e-4)


class ConditionEcho(torch.nn.Module):
    """Output = 0.1·x + mean of the prompt embedding: the two CFG branches differ."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        shift = encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (0.1 * sample * self.weight + shift,)


def test_guided_output_is_uncond_plus_w_times_the_difference(sd_pipeline):
    _, likelihood = step_likelihood(sd_pipeline, guidance=5.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = likelihood.encode(likelihood.tokenize(["a red circle", "a blue square"]))
    guided = likelihood.guided_output(ConditionEcho(), x, torch.tensor([500, 500]), cond)
    null = likelihood.base.encode_text([""])["encoder_hidden_states"].mean()
    text = cond["encoder_hidden_states"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
    expected = (0.1 * x + null) + 5.0 * (text - null)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)


def test_sdxl_step_likelihood_feeds_pooled_embeds_and_generated_time_ids(sdxl_pipeline):
    unet, likelihood = step_likelihood(sdxl_pipeline, "sdxl_spo", guidance=3.0)
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(4, 8, 8, generator=gen)
    records = [{"prompt": "a red circle", "timestep": 501, "prev_timestep": 451, "x_t": x_t,
                "chosen": torch.randn(4, 8, 8, generator=gen), "rejected": torch.randn(4, 8, 8, generator=gen)}]
    batch = likelihood.collate(records, "pair")
    out = likelihood.logps(unet, batch)
    assert out.logps.shape == (2,) and torch.isfinite(out.logps).all()
    # the same guided output by hand: SDXL kwargs with time_ids [16, 16, 0, 0, 16, 16]
    cond = likelihood.base.encode_text(["a red circle"])
    null = likelihood.base.encode_text([""])
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]]).repeat(2, 1)
    with torch.no_grad():
        pred = unet(torch.stack([x_t, x_t]), torch.tensor([501, 501]),
                    encoder_hidden_states=torch.cat([null["encoder_hidden_states"], cond["encoder_hidden_states"]]),
                    added_cond_kwargs={"text_embeds": torch.cat([null["text_embeds"], cond["text_embeds"]]),
                                       "time_ids": time_ids}).sample
        guided = pred[0] + 3.0 * (pred[1] - pred[0])
        mine = likelihood.guided_output(unet, x_t[None], torch.tensor([501]),
                                        likelihood.encode(likelihood.tokenize(["a red circle"])))
    torch.testing.assert_close(mine[0], guided, rtol=1e-4, atol=1e-5)


def test_zero_variance_transition_is_refused(sd_pipeline):
    _, likelihood = step_likelihood(sd_pipeline, guidance=1.0)
    z = torch.zeros(4, 8, 8)
    batch = likelihood.collate([{"prompt": "a", "timestep": 1, "prev_timestep": -1, "x_t": z, "chosen": z,
                                 "rejected": z}], "pair")  # final ᾱ = 1 (set_alpha_to_one): σ = 0
    with pytest.raises(ValueError, match="zero variance"):
        likelihood.logps(FixedOutput(torch.zeros(2, 4, 8, 8)), batch)
