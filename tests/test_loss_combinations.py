"""Several losses at once (MPO; shared/METHODS.md A.9): `loss.name` a list with `loss.weights`
(mmalign/losses_combined.py). TRL agreement is in tests/test_trl_agreement.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmalign.config import ConfigError, LossConfig, load_config
from mmalign.losses import bco_pair_loss, dpo_loss, f_divergence_pairs, get_loss, hinge_loss, sft_loss
from mmalign.losses_combined import combined_spec, loss_spec_for
from mmalign.train.objective import RunningMean, preference_losses
from mmalign.types import LogpOutput, PairLogps, PreferenceBatch

T = torch.tensor


def pair_batch():
    batch = PreferenceBatch("pair", {}, torch.arange(2))
    policy = LogpOutput(T([-1.0, -2.0, -3.0, -1.0]), T([2.0, 3.0, 2.0, 4.0]))
    return batch, policy, LogpOutput(T([-2.0, -2.0, -2.0, -2.0]))


def run(spec, cfg, state=None):
    batch, policy, reference = pair_batch()
    return preference_losses(spec, cfg, batch, policy, reference, lambda x: x, state or RunningMean())[0]


def test_sft_weight_is_a_shorthand_for_a_dpo_sft_list():
    cfg = LossConfig(name=["dpo", "sft"], weights=[1.0, 0.5])
    combined = run(loss_spec_for(cfg.name, cfg.weights), cfg)
    shorthand = run(get_loss("dpo"), LossConfig(sft_weight=0.5))
    assert torch.equal(combined, shorthand)  # bit-exact: 1.0 x dpo + 0.5 x sft
    _, policy, reference = pair_batch()
    manual = dpo_loss(policy.pairs(), reference.pairs(), beta=0.1) + 0.5 * sft_loss(policy.pairs())
    torch.testing.assert_close(combined, manual)


def test_mpo_trio_sums_weighted_terms_and_feeds_the_statistic():
    spec = combined_spec(["dpo", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    assert spec.hyperparameters == ("beta", "f_divergence_type", "f_alpha_divergence_coef")
    assert list(spec.statistics) == ["delta"] and spec.kind == "pair" and spec.needs_reference
    cfg = LossConfig(name=["dpo", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0])
    state = RunningMean()
    values = run(spec, cfg, state)
    _, policy, reference = pair_batch()
    pol, ref = policy.pairs(), reference.pairs()
    expected = (0.8 * dpo_loss(pol, ref, beta=0.1) + 0.2 * bco_pair_loss(pol, ref, beta=0.1, delta=state.mean)
                + 1.0 * sft_loss(pol))
    torch.testing.assert_close(values, expected)
    assert state.count == 4  # the running delta was fed once


def test_f_divergence_applies_per_component():
    cfg = LossConfig(name=["hinge", "sft"], f_divergence_type="forward_kl")
    values = run(loss_spec_for(cfg.name, cfg.weights), cfg)
    _, policy, reference = pair_batch()
    scored = f_divergence_pairs(policy.pairs(), reference.pairs(), "forward_kl")
    torch.testing.assert_close(values, hinge_loss(*scored, beta=0.1) + sft_loss(policy.pairs()))  # sft: raw


def test_combinations_are_checked():
    with pytest.raises(ValueError, match="one weight per loss"):
        combined_spec(["dpo", "sft"], [1.0])
    with pytest.raises(ValueError, match="different data kinds"):
        combined_spec(["dpo", "kto"])
    with pytest.raises(ValueError, match="unknown loss 'dpoo'"):
        combined_spec(["dpoo"])
    assert loss_spec_for("dpo") is get_loss("dpo") and loss_spec_for(["ipo"]) is get_loss("ipo")


def write(tmp_path, loss: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(f"modality: causal_lm\nloss: {{{loss}}}\n")
    return str(path)


def test_config(tmp_path):
    cfg = load_config(write(tmp_path, "name: [dpo, bco_pair, sft], weights: [0.8, 0.2, 1.0]"))
    assert cfg.loss.name == ["dpo", "bco_pair", "sft"] and cfg.loss.weights == [0.8, 0.2, 1.0]
    load_config(write(tmp_path, "name: [simpo, sft], gamma: 0.5"))  # a component's hyperparameter
    load_config(write(tmp_path, "name: [dpo, sft], f_divergence_type: js_divergence"))
    cases = {
        "name: [dpo, sft], weights: [1.0]": "loss.weights needs one weight per loss",
        "name: [dpo, dpoo]": "unknown loss 'dpoo'; did you mean 'dpo'",
        "name: [dpo, dpo]": "lists a loss twice",
        "name: [dpo, kto]": "different data kinds",
        "name: []": "an empty list",
        "name: [dpo, sft], gamma: 0.5": "loss.gamma=0.5 is a hyperparameter of cpo_simpo, simpo, not of loss 'dpo\\+sft'",
        "name: [dpo, bco_pair], f_divergence_type: js_divergence": "not to loss 'bco_pair'",
        "name: [dpo, aot], use_weighting: true": "loss 'aot' sorts its batch",
    }
    for loss, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, loss))


def test_mpo_trains(make_config, tmp_path):
    from mmalign.cli import main

    cfg = make_config(loss={"name": ["dpo", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]}, train={"max_steps": 2})
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] != rows[0]["loss"]
