"""TRL 1.16's other loss types and the f-divergence option (mmalign/losses_trl.py).

Literal values are hand-computed from the formulas in shared/METHODS.md A.1-A.6 (the pins
written there); agreement with TRL's `DPOTrainer` itself is in tests/test_trl_agreement.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.config import ConfigError, LossConfig, load_config
from mmalign.losses import (
    F_DIVERGENCES,
    LOSSES,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    cdpo_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    f_divergence_pairs,
    f_divergence_score,
    get_loss,
    ipo_loss,
    sigmoid_norm_loss,
)
from mmalign.train.objective import RunningMean, preference_losses
from mmalign.types import LogpOutput, PairLogps, PreferenceBatch

T = torch.tensor
NEW = ("exo_pair", "aot", "aot_unpaired", "apo_down", "discopop", "sigmoid_norm")


def ratios(u_c, u_r, n_c=None, n_r=None) -> tuple[PairLogps, PairLogps]:
    """Policy with log-ratios (u_c, u_r) against a zero reference."""
    n = (None, None) if n_c is None else (T(n_c), T(n_r))
    zeros = PairLogps(torch.zeros(len(u_c)), torch.zeros(len(u_r)))
    return PairLogps(T(u_c), T(u_r), *n), zeros


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, T(expected), rtol=0, atol=tol)


# --------------------------------------------------------------------------- hand values


def test_exo_pair_literals_and_minimum():
    close(exo_pair_loss(*ratios([0.0, 1.0], [0.0, 0.0]), beta=0.1, label_smoothing=1e-3), [2.76123, 2.58995])
    # x = 0: q = (1/2, 1/2): KL = log(1/2) - 1/2 log(1 - eps) - 1/2 log eps
    eps = 1e-3
    assert math.isclose(float(exo_pair_loss(*ratios([0.0], [0.0]), beta=0.1, label_smoothing=eps)),
                        math.log(0.5) - 0.5 * math.log1p(-eps) - 0.5 * math.log(eps), rel_tol=1e-6)
    # its minimum, 0, is at delta* = log((1 - eps)/eps)/beta (a bounded target, like IPO)
    star = math.log((1 - eps) / eps) / 0.1
    values = exo_pair_loss(*ratios([star - 5, star, star + 5], [0.0] * 3), beta=0.1, label_smoothing=eps)
    assert abs(float(values[1])) < 1e-5 and values[0] > values[1] < values[2]
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing < 1"):
        exo_pair_loss(*ratios([0.0], [0.0]), beta=0.1, label_smoothing=0.0)


def test_aot_sorts_over_the_batch():
    # policy c - r = [1, -1], reference c - r = [0.5, 0]: delta = sort[-1, 1] - sort[0, 0.5] = [-1, 0.5]
    policy, reference = PairLogps(T([1.0, -1.0]), T([0.0, 0.0])), PairLogps(T([0.5, 0.0]), T([0.0, 0.0]))
    close(aot_loss(policy, reference, beta=0.1, label_smoothing=0.0), [0.74440, 0.66846])
    close(aot_unpaired_loss(*ratios([1.0, -2.0], [0.0, 0.5]), beta=0.1, label_smoothing=0.0), [0.79814, 0.66846])


def test_aot_of_one_pair_is_cdpo_and_its_gradient_flows_through_the_sort():
    policy, reference = PairLogps(T([-3.0]), T([-5.0])), PairLogps(T([-4.0]), T([-4.5]))
    for fn in (aot_loss, aot_unpaired_loss):
        torch.testing.assert_close(fn(policy, reference, beta=0.5, label_smoothing=0.2),
                                   cdpo_loss(policy, reference, beta=0.5, label_smoothing=0.2))
    chosen = T([1.0, -1.0, 3.0], requires_grad=True)
    aot_loss(PairLogps(chosen, torch.zeros(3)), PairLogps(T([0.5, 0.0, 0.2]), torch.zeros(3)),
             beta=0.1, label_smoothing=0.0).sum().backward()
    assert (chosen.grad < 0).all()  # raising any chosen log-likelihood lowers the loss


def test_apo_down_literal():
    close(apo_down_loss(*ratios([1.0], [-1.0]), beta=0.1), [0.97515])
    # sigma(beta u_c) + 1 - sigma(beta (u_c - u_r)), by hand
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    close(apo_down_loss(*ratios([2.0], [5.0]), beta=0.5), [s(1.0) + 1 - s(-1.5)])


def test_discopop_literals_and_large_negative_margin():
    close(discopop_loss(*ratios([1.0, 0.0, -1.0], [0.0] * 3), beta=0.1, discopop_tau=0.05),
          [0.87379, 0.84657, 0.78740])
    # TRL's exp(-x) overflows for x < -88 (fp32): here m exp(-x) = exp(log sigma(x/tau) - x) stays finite
    value = discopop_loss(*ratios([-1000.0], [0.0]), beta=1.0, discopop_tau=0.05)
    assert torch.isfinite(value).all() and float(value) == pytest.approx(1000.0, rel=1e-4)


def test_sigmoid_norm_divides_each_log_ratio_by_its_length():
    close(sigmoid_norm_loss(*ratios([10.0], [-5.0], [10.0], [5.0]), beta=0.1), [0.59814])
    # no token counts (diffusion): plain dpo; a reference without counts uses the policy's
    policy, reference = ratios([1.0, -2.0], [0.5, 3.0])
    torch.testing.assert_close(sigmoid_norm_loss(policy, reference, beta=0.3), dpo_loss(policy, reference, beta=0.3))
    policy = PairLogps(T([-4.0]), T([-9.0]), T([4.0]), T([3.0]))
    reference = PairLogps(T([-6.0]), T([-6.0]))
    close(sigmoid_norm_loss(policy, reference, beta=1.0), [-math.log(1 / (1 + math.exp(-(0.5 + 1.0))))])


@pytest.mark.parametrize("name", NEW)
def test_policy_equal_to_reference(name):
    """u_c = u_r = 0 for every pair: the losses built on delta give their delta = 0 value."""
    logps = PairLogps(T([-3.0, -7.0, -1.0]), T([-2.0, -9.0, -4.0]), T([3.0, 4.0, 2.0]), T([2.0, 5.0, 3.0]))
    hp = {"beta": 0.1, "label_smoothing": 0.1, "discopop_tau": 0.05}
    spec = get_loss(name)
    values = spec.fn(logps, logps, **{k: hp[k] for k in spec.hyperparameters})
    expected = {"exo_pair": math.log(0.5) - 0.5 * math.log(0.9) - 0.5 * math.log(0.1),
                "apo_down": 1.0,  # sigma(0) + 1 - sigma(0)
                "discopop": 0.5 * math.log(2) + 0.5}.get(name, math.log(2))
    close(values, [expected] * 3)


# --------------------------------------------------------------------------- f-divergence


def test_f_divergence_scores_and_sigmoid_pins():
    u = T([1.0])
    close(f_divergence_score(u, "reverse_kl"), [1.0])
    close(f_divergence_score(u, "forward_kl"), [1 - math.exp(-1)])
    close(f_divergence_score(u, "js_divergence"), [math.log(2) - math.log1p(math.exp(-1))])
    close(f_divergence_score(u, "alpha_divergence", 0.5), [0.78694])
    close(f_divergence_score(u, "alpha_divergence", 1.0), [1.0])  # the limit alpha -> 1 is reverse KL
    close(f_divergence_score(T([-1000.0]), "alpha_divergence", 0.5), [(math.exp(80) - 1) / -0.5], tol=1e30)
    # METHODS.md A.6 pins: sigmoid, beta 0.1, u_c = 1, u_r = 0
    pins = {"reverse_kl": 0.64440, "forward_kl": 0.66204, "js_divergence": 0.67433, "alpha_divergence": 0.65457}
    for kind in F_DIVERGENCES:
        close(dpo_loss(*f_divergence_pairs(*ratios([1.0], [0.0]), kind), beta=0.1), [pins[kind]])
    with pytest.raises(ValueError, match="unknown f-divergence 'kl'"):
        f_divergence_score(u, "kl")


def test_f_divergence_for_ipo_and_sigmoid_norm_divides_after_the_transform():
    policy, reference = ratios([2.0], [-1.0], [4.0], [2.0])
    scored = f_divergence_pairs(policy, reference, "forward_kl")
    s_c, s_r = 1 - math.exp(-2.0), 1 - math.exp(1.0)
    close(ipo_loss(*scored, beta=0.5), [((s_c / 4 - s_r / 2) - 1.0) ** 2])
    close(sigmoid_norm_loss(*scored, beta=0.5), [-math.log(1 / (1 + math.exp(-0.5 * (s_c / 4 - s_r / 2))))])


def pair_batch():
    batch = PreferenceBatch("pair", {}, torch.arange(2))
    return batch, LogpOutput(T([-1.0, -2.0, -3.0, -1.0])), LogpOutput(T([-2.0, -2.0, -2.0, -2.0]))


def test_the_trainer_applies_the_f_divergence_from_the_spec_and_logs_raw_rewards():
    batch, policy, reference = pair_batch()
    cfg = LossConfig(name="dpo", f_divergence_type="js_divergence")
    losses, metrics = preference_losses(get_loss("dpo"), cfg, batch, policy, reference, lambda x: x, RunningMean())
    expected = dpo_loss(*f_divergence_pairs(policy.pairs(), reference.pairs(), "js_divergence"), beta=0.1)
    torch.testing.assert_close(losses, expected)
    close(metrics["rewards/chosen"], [0.1, 0.0])  # beta u_c, not beta s(u_c)
    plain, _ = preference_losses(get_loss("dpo"), LossConfig(), batch, policy, reference, lambda x: x, RunningMean())
    assert not torch.allclose(plain, losses)


# --------------------------------------------------------------------------- registry and config


def test_registry_declares_the_new_losses():
    assert {n for n in NEW} <= set(LOSSES)
    assert get_loss("exo_pair").hyperparameters == ("beta", "label_smoothing")
    assert get_loss("discopop").hyperparameters == ("beta", "discopop_tau")
    assert {n for n, s in LOSSES.items() if s.batch_level} == {"aot", "aot_unpaired"}
    assert {n for n, s in LOSSES.items() if s.f_divergence} == {
        "dpo", "cdpo", "robust", "soft", "ipo", "hinge", "exo_pair", "discopop", "sigmoid_norm", "sft"}


def write(tmp_path, loss: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(f"modality: causal_lm\nloss: {{{loss}}}\n")
    return str(path)


def test_config_accepts_and_refuses_the_options(tmp_path):
    cfg = load_config(write(tmp_path, "name: discopop, discopop_tau: 0.1, f_divergence_type: forward_kl"))
    assert cfg.loss.discopop_tau == 0.1 and cfg.loss.f_divergence_type == "forward_kl"
    load_config(write(tmp_path, "name: dpo, f_divergence_type: alpha_divergence, f_alpha_divergence_coef: 0.3"))
    load_config(write(tmp_path, "name: exo_pair, label_smoothing: 0.001"))
    load_config(write(tmp_path, "name: aot, label_smoothing: 0.1"))
    cases = {
        "name: dpo, discopop_tau: 0.1": "loss.discopop_tau=0.1 is a hyperparameter of discopop, not of loss 'dpo'",
        "name: kto, f_divergence_type: js_divergence": "applies only to the losses built on the reward difference",
        "name: aot, f_divergence_type: forward_kl": "not to loss 'aot'",
        "name: dpo, f_divergence_type: kl": "unknown f-divergence 'kl'",
        "name: dpo, f_alpha_divergence_coef: 0.3": "has no effect unless loss.f_divergence_type is alpha_divergence",
        "name: exo_pair": "loss 'exo_pair' needs 0 < loss.label_smoothing < 1",
        "name: apo_down, label_smoothing: 0.1": "not of loss 'apo_down'",
    }
    for loss, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, loss))


# --------------------------------------------------------------------------- LD-DPO


def test_ld_logps_literal_and_padding():
    from mmalign.losses_trl import ld_logps

    # METHODS.md A.8: alpha 0.5, c = 3 tokens of -1, r = 5 tokens of -2 -> -3, -6 + 0.5 (-4) = -8
    right = ld_logps(T([[-1.0, -1, -1, 0, 0], [-2.0, -2, -2, -2, -2]]), T([[1.0, 1, 1, 0, 0], [1.0, 1, 1, 1, 1]]), 0.5)
    left = ld_logps(T([[0.0, 0, -1, -1, -1], [-2.0, -2, -2, -2, -2]]), T([[0.0, 0, 1, 1, 1], [1.0, 1, 1, 1, 1]]), 0.5)
    close(right, [-3.0, -8.0])
    close(left, [-3.0, -8.0])
    token_logps, mask = torch.randn(4, 6), (torch.rand(4, 6) > 0.3).float()
    torch.testing.assert_close(ld_logps(token_logps, mask, 1.0), (token_logps * mask).sum(-1))


def test_ld_pairs_needs_token_values_and_the_trainer_applies_it():
    from mmalign.losses_trl import ld_pairs

    token_logps = T([[-1.0, -1, -1, 0], [-2.0, -2, -2, -2]])
    mask = T([[1.0, 1, 1, 0], [1.0, 1, 1, 1]])
    policy = LogpOutput(token_logps.sum(-1), mask.sum(-1), token_logps, mask)
    reference = LogpOutput(T([0.0, 0.0]), mask.sum(-1), torch.zeros(2, 4), mask)
    pol, ref = ld_pairs(policy, reference, 0.25)
    close(pol.chosen, [-3.0])
    close(pol.rejected, [-6.5])
    close(pol.rejected_tokens, [4.0])
    with pytest.raises(ValueError, match="ld_alpha .* needs per-token log-probs of the reference"):
        ld_pairs(policy, LogpOutput(T([0.0, 0.0])), 0.25)
    batch = PreferenceBatch("pair", {}, torch.arange(1))
    losses, metrics = preference_losses(get_loss("dpo"), LossConfig(ld_alpha=0.25), batch, policy, reference,
                                        lambda x: x, RunningMean())
    torch.testing.assert_close(losses, dpo_loss(pol, ref, beta=0.1))
    close(metrics["logps/rejected"], [-6.5])


def test_ld_alpha_config_and_contract_checks(tmp_path):
    from types import SimpleNamespace

    from mmalign.train.setup import check_contracts

    assert load_config(write(tmp_path, "name: ipo, ld_alpha: 0.5")).loss.ld_alpha == 0.5
    assert LossConfig().ld_alpha is None
    for loss, message in {
        "name: dpo, ld_alpha: 1.5": "loss.ld_alpha must be in \\[0, 1\\]",
        "name: kto, ld_alpha: 0.5": "re-weights chosen/rejected pairs; loss 'kto' takes 'unpaired' data",
        "name: dpo, ld_alpha: 0.5, dense_gamma: 2.0": "choose one",
    }.items():
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, loss))
    path = tmp_path / "p.yaml"
    path.write_text("modality: causal_lm\nloss: {ld_alpha: 0.5}\nreference: {strategy: precomputed}\n")
    with pytest.raises(ConfigError, match="needs per-token reference log-probs"):
        load_config(str(path))

    class NoTokens:  # a likelihood without per-token values (diffusion, flow, audio)
        deterministic = True

        def to(self, device): return self  # noqa: E704
        def collate(self, records, kind): ...  # noqa: E704
        def draw(self, batch, generator): ...  # noqa: E704
        def logps(self, model, batch, draw): ...  # noqa: E704

    with pytest.raises(ConfigError, match="loss.ld_alpha \\(LD-DPO\\) needs per-token log-probs, which NoTokens"):
        check_contracts(SimpleNamespace(loss=LossConfig(ld_alpha=0.5)), NoTokens(), None)


# --------------------------------------------------------------------------- WPO


def test_wpo_weights_literal_and_square_mass():
    from mmalign.losses_trl import wpo_weights
    from mmalign.modalities.causal_lm import log_square_mass

    # METHODS.md A.7: mean_t(log p - log sum p^2) = -0.5 -> w = 0.60653; padding ignored
    token_logps, square = T([[-1.0, -2.0, 0.0]]), T([[-0.5, -1.5, 7.0]])
    close(wpo_weights(token_logps, square, T([[1.0, 1.0, 0.0]])), [0.60653])
    logits = torch.randn(2, 3, 11)
    p = logits.softmax(-1)
    torch.testing.assert_close(log_square_mass(logits), (p**2).sum(-1).log())
    torch.testing.assert_close(log_square_mass(logits.to(torch.bfloat16)),
                               (logits.to(torch.bfloat16).float().softmax(-1) ** 2).sum(-1).log())


def test_the_trainer_weights_every_pair_term():
    from mmalign.losses_trl import wpo_pair_weights

    mask = torch.ones(4, 2)
    token_logps = T([[-1.0, -1.0], [-2.0, -2.0], [-3.0, -1.0], [-1.0, -1.0]])
    square = torch.full((4, 2), -1.5)
    policy = LogpOutput(token_logps.sum(-1), mask.sum(-1), token_logps, mask, token_log_sq_mass=square)
    reference = LogpOutput(T([-2.0, -2.0, -2.0, -2.0]), mask.sum(-1))
    weights = wpo_pair_weights(policy)
    close(weights, [math.exp(0.5) * math.exp(-0.5), math.exp(-0.5) * math.exp(0.5)])
    batch = PreferenceBatch("pair", {}, torch.arange(2))
    cfg = LossConfig(use_weighting=True, sft_weight=0.5)
    losses, metrics = preference_losses(get_loss("dpo"), cfg, batch, policy, reference, lambda x: x, RunningMean())
    from mmalign.losses import sft_loss

    torch.testing.assert_close(losses, (dpo_loss(policy.pairs(), reference.pairs(), beta=0.1)
                                        + 0.5 * sft_loss(policy.pairs())) * weights)
    torch.testing.assert_close(metrics["wpo/weight"], weights)
    with pytest.raises(ValueError, match=r"use_weighting \(WPO\) needs the policy's per-token log-probs"):
        wpo_pair_weights(LogpOutput(T([0.0, 0.0])))


def test_use_weighting_config_and_contract_checks(tmp_path):
    from types import SimpleNamespace

    from mmalign.train.setup import check_contracts

    assert load_config(write(tmp_path, "name: ipo, use_weighting: true")).loss.use_weighting
    for loss, message in {
        "name: aot, use_weighting: true": "loss 'aot' sorts its batch",
        "name: kto, use_weighting: true": "loss 'kto' takes 'unpaired' data",
    }.items():
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, loss))

    class NoTokens:
        deterministic = True

        def to(self, device): return self  # noqa: E704
        def collate(self, records, kind): ...  # noqa: E704
        def draw(self, batch, generator): ...  # noqa: E704
        def logps(self, model, batch, draw): ...  # noqa: E704

    with pytest.raises(ConfigError, match=r"loss.use_weighting \(WPO\) needs per-token probabilities, which NoTokens"):
        check_contracts(SimpleNamespace(loss=LossConfig(use_weighting=True)), NoTokens(), None)


# --------------------------------------------------------------------------- one train step each


@pytest.mark.parametrize("loss", [
    {"name": "exo_pair", "label_smoothing": 1e-3},
    {"name": "aot", "label_smoothing": 0.1},
    {"name": "aot_unpaired"},
    {"name": "apo_down"},
    {"name": "discopop"},
    {"name": "sigmoid_norm", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"name": "dpo", "ld_alpha": 0.5, "f_divergence_type": "js_divergence"},
    {"name": "ipo", "use_weighting": True, "sft_weight": 0.5},
], ids=lambda d: "-".join(str(v) for v in d.values()))
def test_text_train_steps(make_config, tmp_path, loss):
    import json

    from mmalign.cli import main

    cfg = make_config(loss=loss, train={"max_steps": 2})
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] != rows[0]["loss"]
