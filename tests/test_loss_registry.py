"""The loss registry declares what each loss needs, and the trainer supplies it from the declaration.

Every loss is registered with its hyperparameters (its keyword-only parameters), the batch
fields it reads and the batch statistics gathered over all processes. `preference_losses`
feeds a loss from its `LossSpec` alone: the toy losses below, unknown to
mmalign/train/objective.py, get their field and statistic without any change there. The config
refuses another loss's hyperparameter set to a non-default value.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mmalign import losses as L
from mmalign.config import ConfigError, LossConfig, load_config
from mmalign.losses import LOSSES, LossSpec, Statistic, get_loss
from mmalign.train.objective import RunningMean, preference_losses
from mmalign.types import LogpOutput, PairLogps, PreferenceBatch

T = torch.tensor


def two_processes(x: Tensor) -> Tensor:
    """A gather as if a second process held 10 x this one's values."""
    return torch.cat([x, 10 * x])


def pair_batch(**fields) -> tuple[PreferenceBatch, LogpOutput, LogpOutput]:
    """B = 2 pairs: policy chosen (-1, -2), rejected (-3, -1); reference all -2."""
    batch = PreferenceBatch("pair", {}, torch.arange(2), **fields)
    return batch, LogpOutput(T([-1.0, -2.0, -3.0, -1.0])), LogpOutput(T([-2.0, -2.0, -2.0, -2.0]))


# --------------------------------------------------------------------------- declarations


def test_each_loss_declares_its_fields_statistics_and_hyperparameters() -> None:
    assert get_loss("soft").fields == ("soft_labels",)
    assert get_loss("kto").fields == ("desirable",) and get_loss("ranked").fields == ("scores",)
    assert get_loss("grpo").fields == ("advantages", "old_logps")
    assert get_loss("nft").fields == ("optimality",) and get_loss("nft").kind == "rewarded"
    assert {n for n, s in LOSSES.items() if s.fields} == {"soft", "kto", "ranked", "grpo", "nft"}
    assert get_loss("bco_pair").statistics == {"delta": L.BCO_DELTA} and L.BCO_DELTA.running
    assert get_loss("kto").statistics == {"reference_point": L.KTO_Z}
    assert L.KTO_Z.mismatched and L.KTO_Z.metric == "kl" and not L.KTO_Z.running
    assert {n for n, s in LOSSES.items() if s.statistics} == {"bco_pair", "kto"}
    assert get_loss("dpo").hyperparameters == ("beta",)
    assert get_loss("simpo").hyperparameters == ("beta", "gamma")
    assert get_loss("spo").hyperparameters == ("beta", "clip")
    assert get_loss("bco_pair").hyperparameters == ("beta",)  # delta is a statistic
    assert get_loss("soft").hyperparameters == ("beta",)  # soft_labels is a batch field
    assert get_loss("kto").hyperparameters == ("beta", "desirable_weight", "undesirable_weight")
    assert get_loss("sft").hyperparameters == ()
    assert get_loss("grpo").hyperparameters == ("clip", "kl_beta", "adv_clip_max")
    assert get_loss("nft").hyperparameters == ("beta", "adv_clip_max", "kl_beta")  # one loss.adv_clip_max


def toy_loss(policy: PairLogps, reference: PairLogps, *, beta: float, soft_labels: Tensor,
             shift: float | Tensor = 0.0) -> Tensor:
    """p * beta * d - shift, (B,)."""
    d = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    return soft_labels * beta * d - shift


def test_a_spec_is_checked_against_the_batch_and_its_function() -> None:
    with pytest.raises(ValueError, match="batch field 'soft_label' is not one of"):
        LossSpec(toy_loss, "pair", fields=("soft_label",))
    with pytest.raises(ValueError, match="toy_loss has no parameter 'offset'"):
        LossSpec(toy_loss, "pair", statistics={"offset": L.BCO_DELTA})
    with pytest.raises(ValueError, match="loss kind 'pairs' is not one of pair, unpaired, ranked"):
        LossSpec(toy_loss, "pairs")
    with pytest.raises(ValueError, match="at most one running statistic"):
        LossSpec(toy_loss, "pair", statistics={"shift": L.BCO_DELTA, "beta": L.BCO_DELTA})


# --------------------------------------------------------------------------- the trainer feeds a spec


def test_a_new_loss_is_fed_its_declared_batch_field() -> None:
    spec = LossSpec(toy_loss, "pair", fields=("soft_labels",))
    batch, policy, reference = pair_batch(soft_labels=T([0.25, 1.0]))
    losses, metrics = preference_losses(spec, LossConfig(name="toy", beta=2.0), batch, policy, reference,
                                        two_processes, RunningMean())
    # d = (1 - (-1), 0 - 1) = (2, -1): p * beta * d = (0.25 * 2 * 2, 1 * 2 * -1)
    assert losses.tolist() == [1.0, -2.0]
    assert metrics["loss"].tolist() == [1.0, -2.0] and "rewards/margins" in metrics
    with pytest.raises(ValueError, match="loss 'toy' needs a 'soft_label' column"):
        preference_losses(spec, LossConfig(name="toy"), pair_batch()[0], policy, reference, two_processes,
                          RunningMean())


def test_a_new_loss_is_fed_its_declared_statistic_over_all_processes() -> None:
    """shift = max of the chosen log-ratios hc of every process (here this one's and 10x them)."""
    top = Statistic(lambda p, r: p.chosen - r.chosen, lambda world, hp: world.max() * hp["beta"], metric="top")
    spec = LossSpec(toy_loss, "pair", fields=("soft_labels",), statistics={"shift": top})
    batch, policy, reference = pair_batch(soft_labels=T([0.0, 0.0]))
    losses, metrics = preference_losses(spec, LossConfig(name="toy", beta=0.5), batch, policy, reference,
                                        two_processes, RunningMean())
    # hc = (1, 0), world = (1, 0, 10, 0): shift = 10 * 0.5
    assert losses.tolist() == [-5.0, -5.0] and metrics["top"].tolist() == [5.0]


def test_a_running_statistic_is_the_mean_of_every_world_batch_so_far() -> None:
    spec = LossSpec(toy_loss, "pair", fields=("soft_labels",),
                    statistics={"shift": Statistic(lambda p, r: p.chosen - r.chosen, lambda w, hp: w.mean(),
                                                   running=True)})
    batch, policy, reference = pair_batch(soft_labels=T([0.0, 0.0]))
    state, cfg = RunningMean(), LossConfig(name="toy")
    first, _ = preference_losses(spec, cfg, batch, policy, reference, two_processes, state)
    # world = (1, 0, 10, 0): mean 2.75 over 4 values
    assert first.tolist() == [-2.75, -2.75] and state.state_dict() == {"mean": 2.75, "count": 4}
    second, _ = preference_losses(spec, cfg, batch, policy, reference, lambda x: x, state)
    # world = (1, 0): mean 0.5; running mean (2.75 * 4 + 0.5 * 2) / 6 = 2
    assert second.tolist() == [-2.0, -2.0] and state.state_dict() == {"mean": 2.0, "count": 6}


def test_bco_pair_gets_the_running_reward_mean_delta() -> None:
    batch, policy, reference = pair_batch()
    state, cfg = RunningMean(), LossConfig(name="bco_pair", beta=0.5)
    losses, _ = preference_losses(get_loss("bco_pair"), cfg, batch, policy, reference, two_processes, state)
    # cat(hc, hr) = (1, 0, -1, 1), world adds 10x: rewards 0.5 * world, mean 0.5 * 11/8
    delta = 0.5 * 11 / 8
    assert state.state_dict() == {"mean": delta, "count": 8}
    expected = L.bco_pair_loss(policy.pairs(), reference.pairs(), beta=0.5, delta=delta)
    assert torch.equal(losses, expected)


def test_kto_gets_z_from_the_mismatched_items_of_all_processes() -> None:
    batch = PreferenceBatch("unpaired", {}, torch.arange(3), desirable=T([True, False, True]))
    policy, reference = LogpOutput(T([-1.0, -2.0, -3.0])), LogpOutput(T([-2.0, -2.0, -2.0]))
    cfg = LossConfig(name="kto", beta=0.5, undesirable_weight=2.0)
    mismatched = T([0.1, -0.3, 0.5])  # mean 0.1, world (x, 10x) mean 0.55
    losses, metrics = preference_losses(get_loss("kto"), cfg, batch, policy, reference, two_processes,
                                        RunningMean(), mismatched)
    z = torch.cat([mismatched, 10 * mismatched]).mean()
    assert metrics["kl"].tolist() == [pytest.approx(0.55)]
    expected = L.kto_loss(policy.logps, reference.logps, batch.desirable, beta=0.5, reference_point=z,
                          undesirable_weight=2.0)
    assert torch.equal(losses, expected)
    _, own = preference_losses(get_loss("kto"), cfg, batch, policy, reference, lambda x: x, RunningMean())
    assert own["kl"].tolist() == [0.0]  # the batch's own h = (1, 0, -1): max(0, 0)


# --------------------------------------------------------------------------- config check at load


@pytest.fixture
def config(tmp_path):
    def load(*overrides: str):
        path = tmp_path / "c.yaml"
        path.write_text("model: {path: m}\n")
        return load_config(path, list(overrides))
    return load


@pytest.mark.parametrize("overrides,message", [
    (["loss.name=dpoo"], "loss.name: unknown loss 'dpoo'; did you mean 'dpo'?"),
    (["loss.name=kt0"], "loss.name: unknown loss 'kt0'; did you mean 'kto'?"),
    (["loss.name=xyzzy"], "loss.name: unknown loss 'xyzzy'; valid: aot, aot_unpaired, apo_down, apo_zero, bco_pair, cdpo,"),
    (["modality=llavaa"], "modality: unknown modality 'llavaa'; did you mean 'llava'?"),
    (["modality=sdx1"], "modality: unknown modality 'sdx1'; did you mean 'sdxl'?"),
    (["loss.name=dpo", "loss.gamma=0.5"],
     "loss.gamma=0.5 is a hyperparameter of cpo_simpo, simpo, not of loss 'dpo', which takes: beta"),
    (["loss.name=kto", "loss.label_smoothing=0.1"], "loss.label_smoothing=0.1 is a hyperparameter of aot, aot_unpaired, cdpo, cpo, cpo_simpo, exo_pair, robust, "
     "not of loss 'kto', which takes: beta, desirable_weight, undesirable_weight"),
    (["loss.name=ipo", "loss.clip=0.2"], "loss.clip=0.2 is a hyperparameter of d3po, grpo, spo, not of loss 'ipo'"),
    (["loss.name=dpo", "loss.undesirable_weight=2"], "loss.undesirable_weight=2.0 is a hyperparameter of kto"),
    (["loss.name=sft", "loss.gamma=1"], "not of loss 'sft', which takes no hyperparameters"),
])
def test_unknown_names_and_other_losses_hyperparameters_are_refused(config, overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["loss.name=simpo", "loss.gamma=0.5", "reference.strategy=none"],
    ["loss.name=cdpo", "loss.label_smoothing=0.2"],
    ["loss.name=spo", "loss.clip=0.2", "modality=sd_spo"],
    ["loss.name=kto", "loss.desirable_weight=1.5", "loss.kto_reference_point=batch"],
    ["loss.name=dpo", "loss.clip=0.1", "loss.gamma=0.0"],  # another loss's hyperparameter at its default
    ["loss.name=sft", "loss.beta=0.5"],  # beta also scales the logged rewards
    # trainer options, with any loss
    ["loss.name=ipo", "loss.sft_weight=1.0", "loss.dense_gamma=2.0"],
    ["loss.name=dpo", "modality=llava", "loss.image_term=mdpo", "loss.image_term_weight=0.5",
     "loss.anchor_delta=0.1", "loss.corruption=mask", "loss.corruption_mask_ratio=0.5"],
])
def test_a_loss_own_hyperparameters_and_trainer_options_load(config, overrides) -> None:
    config(*overrides)


def test_the_check_reads_the_registries(config, monkeypatch) -> None:
    """A loss or modality added to its registry is known to the config with no other change."""
    monkeypatch.setitem(LOSSES, "toy", LossSpec(L.simpo_loss, "pair", needs_reference=False))
    import mmalign.families

    names = mmalign.families.family_names()
    monkeypatch.setattr(mmalign.families, "family_names", lambda: [*names, "toy_modality"])  # a new family module
    assert config("loss.name=toy", "loss.gamma=0.5", "modality=toy_modality").loss.name == "toy"
    with pytest.raises(ConfigError, match="loss.clip=0.2 is a hyperparameter of d3po, grpo, spo, not of loss 'toy'"):
        config("loss.name=toy", "loss.clip=0.2")
