"""ORPO, CPO / CPO-SimPO, DPOP, MaPO and CPL (mmalign/losses_more.py; shared/METHODS.md B.1-B.4,
B.6): hand-computed values, the invariants that hold, the modality scope checked at config load,
and one train step per loss on the tiny text, VLM and step (SPO / D3PO) models. The diffusion and
flow train steps of dpop and mapo run in tests/test_diffusion_losses.py (every pair loss whose
scope includes the ELBO); TRL agreement of orpo and cpo in tests/test_trl_agreement.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmalign.config import ConfigError, load_config
from mmalign.losses import LOSSES, dpo_loss, get_loss, simpo_loss
from mmalign.losses_more import (
    SCOPES, cpl_loss, cpo_loss, cpo_simpo_loss, dpop_loss, mapo_loss, mapo_ratio_term, orpo_log_odds, orpo_loss,
)
from mmalign.types import PairLogps

T = torch.tensor
ROOT = Path(__file__).resolve().parents[1]
ZERO = PairLogps(T([0.0]), T([0.0]))


def lit(value: torch.Tensor, expected: float, tol: float = 1e-5) -> None:
    assert float(value) == pytest.approx(expected, abs=tol)


# --------------------------------------------------------------------------- ORPO


def test_orpo_hand_computed():
    # a_c = -2/4 = -0.5, a_r = -3/3 = -1.0:
    # LO = 0.5 - (log(1 - e^-0.5) - log(1 - e^-1)) = 0.5 - (-0.932752 + 0.458675) = 0.974077
    # OR term = -0.1 log sigma(0.974077) = 0.1 * 0.320300 = 0.032030; NLL(chosen) = 2/4 = 0.5
    p = PairLogps(T([-2.0]), T([-3.0]), T([4]), T([3]))
    lit(orpo_log_odds(p), 0.974077)
    lit(orpo_loss(p, beta=0.1), 0.5 + 0.032030)
    lit(orpo_loss(p, beta=1.0), 0.5 + 0.320300)


def test_orpo_odds_ratio_is_antisymmetric_and_log2_at_equal_means():
    p = PairLogps(T([-2.0, -7.0]), T([-3.0, -1.0]), T([4, 5]), T([3, 2]))
    swapped = PairLogps(p.rejected, p.chosen, p.rejected_tokens, p.chosen_tokens)
    torch.testing.assert_close(orpo_log_odds(swapped), -orpo_log_odds(p))
    # -log sigma(LO) + log sigma(-LO) = -LO: the two OR terms differ by lambda * LO
    nll = -p.chosen / p.chosen_tokens
    nll_swapped = -p.rejected / p.rejected_tokens
    torch.testing.assert_close((orpo_loss(p, beta=0.1) - nll) - (orpo_loss(swapped, beta=0.1) - nll_swapped),
                               -0.1 * orpo_log_odds(p))
    equal = PairLogps(T([-3.0]), T([-6.0]), T([3]), T([6]))  # same mean -1: LO = 0, OR term = lambda log 2
    lit(orpo_loss(equal, beta=0.1), 1.0 + 0.1 * math.log(2))


def test_orpo_is_finite_where_the_mean_log_prob_reaches_zero():
    p = PairLogps(T([0.0], requires_grad=True), T([-3.0]), T([2]), T([3]))
    out = orpo_loss(p, beta=0.1)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(p.chosen.grad).all()


# --------------------------------------------------------------------------- CPO, CPO-SimPO


def test_cpo_hand_computed():
    # sums -10 vs -15, beta 0.1: -log sigma(0.5) = 0.474077; NLL(chosen) = 10/5 = 2
    p = PairLogps(T([-10.0]), T([-15.0]), T([5]), T([6]))
    lit(cpo_loss(p, beta=0.1, label_smoothing=0.0, cpo_alpha=0.0), 0.474077)
    lit(cpo_loss(p, beta=0.1, label_smoothing=0.0, cpo_alpha=1.0), 2.474077)
    # eps 0.1: 0.9 * 0.474077 + 0.1 * (-log sigma(-0.5) = 0.974077) = 0.524077
    lit(cpo_loss(p, beta=0.1, label_smoothing=0.1, cpo_alpha=0.0), 0.524077)


def test_cpo_simpo_hand_computed_and_equal_to_simpo_plus_nll():
    # mean log-probs -1 (= -4/4) vs -1.5 (= -3/2), gamma 0.5: -log sigma(0.05 - 0.5) = 0.943249
    p = PairLogps(T([-4.0]), T([-3.0]), T([4]), T([2]))
    lit(cpo_simpo_loss(p, beta=0.1, gamma=0.5, label_smoothing=0.0, cpo_alpha=0.0), 0.943249)
    torch.testing.assert_close(cpo_simpo_loss(p, beta=0.1, gamma=0.5, label_smoothing=0.0, cpo_alpha=0.5),
                               simpo_loss(p, beta=0.1, gamma=0.5) + 0.5 * 1.0)


# --------------------------------------------------------------------------- DPOP


def test_dpop_hand_computed():
    # u_c = -0.1, u_r = -1.0, beta 0.1, lambda 50: -log sigma(0.1 (0.9 - 50 * 0.1)) = -log sigma(-0.41) = 0.919014
    pol, ref = PairLogps(T([-0.1]), T([-1.0])), ZERO
    lit(dpop_loss(pol, ref, beta=0.1, dpop_lambda=50.0), 0.919014)
    lit(dpo_loss(pol, ref, beta=0.1), 0.649159)  # plain DPO: -log sigma(0.09)


def test_dpop_equals_dpo_while_the_chosen_log_ratio_is_not_negative():
    g = torch.Generator().manual_seed(0)
    pol = PairLogps(torch.randn(64, generator=g), torch.randn(64, generator=g))
    ref = PairLogps(torch.randn(64, generator=g), torch.randn(64, generator=g))
    dpop, dpo = dpop_loss(pol, ref, beta=0.5, dpop_lambda=50.0), dpo_loss(pol, ref, beta=0.5)
    up = pol.chosen >= ref.chosen
    assert up.any() and (~up).any()
    torch.testing.assert_close(dpop[up], dpo[up])
    assert (dpop[~up] > dpo[~up]).all()  # a falling chosen likelihood is penalised
    torch.testing.assert_close(dpop_loss(pol, ref, beta=0.5, dpop_lambda=0.0), dpo)


# --------------------------------------------------------------------------- MaPO


def mapo_in_mse_units(m_w: float, m_l: float, beta: float, timesteps: int, snr: float = 0.5) -> float:
    """MaPO as mapo-t2i/mapo's compute_loss writes it on the mse, in float64."""
    g = lambda m: snr * m / math.expm1(snr * m)  # noqa: E731
    return m_w - beta * -math.log1p(math.exp(-timesteps * (g(m_w) - g(m_l))))


def test_mapo_hand_computed_in_mmalign_units():
    # mse 0.100 vs 0.101 -> logp = -0.5 mse = -0.05, -0.0505; G(x) = x/(e^x - 1):
    # LO = G(0.05) - G(0.0505) = 2.4581e-4, T LO = 0.24581, -log sigma(0.24581) = 0.577775
    # L = m_w + beta * 0.577775 = 0.100 + 0.0577775 = 0.157777
    p = PairLogps(T([-0.05]), T([-0.0505]))
    assert float(mapo_ratio_term(p)) == pytest.approx(2.4581e-4, rel=2e-3)  # fp32 cancellation of G(.)
    lit(mapo_loss(p, beta=0.1, mapo_timesteps=1000), 0.157777, tol=2e-5)


def test_mapo_matches_the_mse_formula_and_its_sft_half_is_twice_the_image_nll():
    mse_w, mse_l = [0.31, 0.08, 0.52, 0.2], [0.30, 0.11, 0.52, 0.9]
    p = PairLogps(-0.5 * T(mse_w), -0.5 * T(mse_l))
    ours = mapo_loss(p, beta=0.1, mapo_timesteps=1000)
    expected = [mapo_in_mse_units(w, l, 0.1, 1000) for w, l in zip(mse_w, mse_l)]
    torch.testing.assert_close(ours, T(expected), rtol=0, atol=1e-4)
    # equal mse: LO = 0, L = m_w + beta log 2 = -2 logp_w + beta log 2
    lit(ours[2], 0.52 + 0.1 * math.log(2))
    # a lower-mse chosen (larger G) is a positive margin: the ratio term is below beta log 2
    assert float(mapo_ratio_term(p)[1]) > 0 and float(ours[1] - 0.08) < 0.1 * math.log(2)


def test_mapo_guards_zero_mse():
    p = PairLogps(T([0.0], requires_grad=True), T([-0.05]))
    out = mapo_loss(p, beta=0.1, mapo_timesteps=1000)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(p.chosen.grad).all()


# --------------------------------------------------------------------------- CPL


def test_cpl_hand_computed_and_its_conservative_bias():
    # alpha 0.1, lambda 0.5, S(c) = -10, S(r) = -30: -log sigma(-1 + 1.5) = 0.474077
    p = PairLogps(T([-10.0]), T([-30.0]))
    lit(cpl_loss(p, beta=0.1, cpl_lambda=0.5), 0.474077)
    # lambda = 1: -log sigma(0.1 (-10 + 30)) = -log sigma(2) = 0.126928, a function of S(c) - S(r)
    lit(cpl_loss(p, beta=0.1, cpl_lambda=1.0), 0.126928)
    shifted = PairLogps(p.chosen + 7, p.rejected + 7)
    torch.testing.assert_close(cpl_loss(shifted, beta=0.1, cpl_lambda=1.0), cpl_loss(p, beta=0.1, cpl_lambda=1.0))
    # S + 7 = -3, -23: -log sigma(-0.3 + 0.5 * 2.3) = -log sigma(0.85) = 0.355865, not 0.474077 (lambda < 1)
    biased = cpl_loss(shifted, beta=0.1, cpl_lambda=0.5)
    lit(biased, 0.355865)


# --------------------------------------------------------------------------- registry and config


def test_registry_declares_the_new_losses():
    assert {"orpo", "cpo", "cpo_simpo", "dpop", "mapo", "cpl"} <= set(LOSSES)
    assert [n for n in ("orpo", "cpo", "cpo_simpo", "dpop", "mapo", "cpl") if get_loss(n).needs_reference] == ["dpop"]
    assert get_loss("orpo").hyperparameters == ("beta",)
    assert get_loss("cpo").hyperparameters == ("beta", "label_smoothing", "cpo_alpha")
    assert get_loss("dpop").hyperparameters == ("beta", "dpop_lambda")
    assert get_loss("mapo").hyperparameters == ("beta", "mapo_timesteps")
    assert get_loss("cpl").hyperparameters == ("beta", "cpl_lambda")
    assert not any(get_loss(n).f_divergence for n in SCOPES)


def lm_config(*overrides: str):
    return load_config(ROOT / "configs" / "tiny" / "lm_dpo.yaml", ["data.train=x.jsonl", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.name=orpo", "modality=sdxl"], "loss 'orpo' does not apply to modality 'sdxl' (elbo likelihood): its odds "
                                          "ratio and NLL are over token probabilities"),
    (["loss.name=cpo", "modality=sd3"], "loss 'cpo' does not apply to modality 'sd3' (elbo likelihood)"),
    (["loss.name=[dpo, cpo_simpo]", "modality=flux"], "loss 'cpo_simpo' does not apply to modality 'flux'"),
    (["loss.name=orpo", "modality=sd_spo"], "loss 'orpo' does not apply to modality 'sd_spo' (step likelihood)"),
    (["loss.name=mapo"], "loss 'mapo' does not apply to modality 'causal_lm' (tokens likelihood): it is defined on "
                         "the diffusion / flow ELBO's mse"),
    (["loss.name=mapo", "modality=sdxl_spo"], "loss 'mapo' does not apply to modality 'sdxl_spo' (step likelihood)"),
    (["loss.name=cpl", "modality=sdxl"], "loss 'cpl' does not apply to modality 'sdxl' (elbo likelihood): it needs "
                                         "an action log-likelihood"),
    (["loss.name=cpl", "loss.cpl_lambda=0"], "loss.cpl_lambda must be in (0, 1]"),
    (["loss.name=dpo", "loss.dpop_lambda=5"], "loss.dpop_lambda=5.0 is a hyperparameter of dpop, not of loss 'dpo'"),
    (["loss.name=orpo", "loss.cpo_alpha=0.5"], "loss.cpo_alpha=0.5 is a hyperparameter of cpo, cpo_simpo"),
])
def test_the_config_refuses_a_loss_outside_its_scope(overrides, message):
    with pytest.raises(ConfigError) as err:
        lm_config(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["loss.name=orpo", "modality=llava"], ["loss.name=cpo", "loss.cpo_alpha=0.5"],
    ["loss.name=mapo", "modality=sdxl", "loss.mapo_timesteps=1000"], ["loss.name=mapo", "modality=sd3"],
    ["loss.name=mapo", "modality=audioldm2"], ["loss.name=cpl", "modality=sd_spo", "loss.cpl_lambda=0.5"],
    ["loss.name=cpl"], ["loss.name=dpop", "modality=flux", "loss.dpop_lambda=5"],
])
def test_the_config_accepts_a_loss_in_its_scope(overrides):
    lm_config(*overrides)


# --------------------------------------------------------------------------- one train step each


@pytest.mark.parametrize("loss", [
    {"name": "orpo"}, {"name": "cpo"}, {"name": "cpo_simpo", "gamma": 0.5}, {"name": "dpop", "dpop_lambda": 5.0},
    {"name": "cpl"},
], ids=lambda d: d["name"])
def test_text_train_step(make_config, tmp_path, loss):
    from mmalign.cli import main

    assert main(["train", str(make_config(loss=loss, train={"max_steps": 2}))]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] != rows[0]["loss"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from mmalign.toyvlm import make_shape_pairs, save_tiny_llava

    root = tmp_path_factory.mktemp("vlm")
    return save_tiny_llava(root / "llava", seed=0), make_shape_pairs(4, 0, root / "shapes")


@pytest.mark.parametrize("name", ["orpo", "cpo", "dpop"])
def test_vlm_train_step(tmp_path, tiny_vlm, name):
    from mmalign.cli import main

    llava, pairs = tiny_vlm
    out = tmp_path / "run"
    argv = ["train", str(ROOT / "configs" / "tiny" / "llava_dpo.yaml"), f"model.path={llava}", f"data.train={pairs}",
            "data.eval=", f"loss.name={name}", f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=4",
            "train.log_every=1", "train.progress=false", "train.tensorboard=false", "data.max_length=64"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and rows[0]["loss"] > 0


def test_cpl_trains_on_d3po_step_transitions(tmp_path):
    """CPL over the SPO / D3PO step likelihood: one record = one transition of a trajectory pair."""
    from mmalign.cli import main

    out = tmp_path / "run"
    argv = ["train", str(ROOT / "configs/tiny/spo.yaml"), f"train.output_dir={out}", "train.progress=false",
            "train.tensorboard=false", "spo.method=d3po", "spo.threshold=0.0", "spo.num_steps=4",
            "spo.prompts_per_round=2", "spo.sample_batch_size=2", "spo.round_steps=2", "train.batch_size=2",
            "train.max_steps=2", "train.log_every=1", "loss.name=cpl", "loss.beta=0.1", "loss.cpl_lambda=0.5"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # the logged loss is the batch mean of -log sigma(0.1 S(c) - 0.05 S(r)), convex in the (linear) argument,
    # so by Jensen it is >= the loss at the logged batch means of S (the step log-likelihoods)
    first = rows[0]
    at_means = -F.logsigmoid(T(0.1 * first["logps/chosen"] - 0.05 * first["logps/rejected"], dtype=torch.float64))
    assert first["loss"] >= float(at_means) - 1e-6
