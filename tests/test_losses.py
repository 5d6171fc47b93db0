"""Tests for mmalign.losses (shared/METHODS.md section 1).

Literal values were worked out by hand with Python's `math` module, separately from
the library, using ls(x) = -log(1 + exp(-x)) (= log sigma(x)) and
sig(x) = 1 / (1 + exp(-x)); the derivation is in the comment above each number.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmalign import losses as L
from mmalign.losses import (
    LOSSES,
    PAIR_LOSSES,
    LossSpec,
    apo_zero_loss,
    bco_pair_loss,
    bco_reward_mean,
    cdpo_loss,
    dpo_loss,
    get_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    loss_hyperparameters,
    nca_pair_loss,
    ranked_loss,
    robust_loss,
    sft_loss,
    simpo_loss,
    soft_loss,
    sppo_hard_loss,
)
from mmalign.types import PairLogps

LOG2 = math.log(2)  # 0.693147...


def T(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def pair(hc: float, hr: float) -> tuple[PairLogps, PairLogps]:
    """One example with log-ratios hc, hr, built from non-trivial raw log-likelihoods."""
    ref = PairLogps(T(-11.0), T(-12.5))
    return PairLogps(ref.chosen + hc, ref.rejected + hr), ref


def value(fn, hc: float, hr: float, **hp) -> float:
    return fn(*pair(hc, hr), **hp).item()


# --------------------------------------------------------------------------- literal values


def test_dpo_literals() -> None:
    # beta 0.1, d 1: -ls(0.1) = log(1 + e^-0.1) = 0.64440
    assert value(dpo_loss, 1.0, 0.0, beta=0.1) == pytest.approx(0.6444, abs=1e-4)
    # d 0: log 2 = 0.69315
    assert value(dpo_loss, 0.7, 0.7, beta=0.1) == pytest.approx(0.6931, abs=1e-4)
    # policy (-10, -14), reference (-11, -12.5): hc 1, hr -1.5, d 2.5; beta 0.5: -ls(1.25) = 0.25193
    pol, ref = PairLogps(T(-10.0), T(-14.0)), PairLogps(T(-11.0), T(-12.5))
    assert dpo_loss(pol, ref, beta=0.5).item() == pytest.approx(0.2519, abs=1e-4)


def test_cdpo_literal() -> None:
    # hc 3, hr -2, d 5, beta 0.2 -> z 1, eps 0.1: -0.9 ls(1) - 0.1 ls(-1) = 0.41326
    assert value(cdpo_loss, 3.0, -2.0, beta=0.2, label_smoothing=0.1) == pytest.approx(
        0.4133, abs=1e-4
    )


def test_robust_literal() -> None:
    # hc 0.5, hr -1.5, d 2, beta 0.5 -> z 1, eps 0.2:
    # [0.8 (-ls(1)) - 0.2 (-ls(-1))] / 0.6 = -0.02007 (an unbiased estimate may be negative)
    assert value(robust_loss, 0.5, -1.5, beta=0.5, label_smoothing=0.2) == pytest.approx(
        -0.0201, abs=1e-4
    )


def test_ipo_literal_length_normalised() -> None:
    # beta 0.4 -> 1/(2 beta) = 1.25.
    # policy chosen -20 / 10 tokens = -2, rejected -30 / 5 tokens = -6;
    # reference chosen -25 / 10 = -2.5, rejected -20 / 5 = -4.
    # hc 0.5, hr -2, d 2.5: (2.5 - 1.25)^2 = 1.5625
    tc, tr = T(10.0), T(5.0)
    pol = PairLogps(T(-20.0), T(-30.0), tc, tr)
    ref = PairLogps(T(-25.0), T(-20.0), tc, tr)
    assert ipo_loss(pol, ref, beta=0.4).item() == pytest.approx(1.5625, abs=1e-4)
    # a reference without counts (precomputed) is averaged with the policy's counts
    ref_plain = PairLogps(T(-25.0), T(-20.0))
    assert ipo_loss(pol, ref_plain, beta=0.4).item() == pytest.approx(1.5625, abs=1e-4)
    # without token counts the sums are used: hc 5, hr -10, d 15: (15 - 1.25)^2 = 189.0625
    pol_plain = PairLogps(T(-20.0), T(-30.0))
    assert ipo_loss(pol_plain, ref_plain, beta=0.4).item() == pytest.approx(189.0625, abs=1e-4)


def test_hinge_literals() -> None:
    # beta 0.3, d 2 (hc 1.5, hr -0.5): 1 - 0.6 = 0.4
    assert value(hinge_loss, 1.5, -0.5, beta=0.3) == pytest.approx(0.4, abs=1e-4)
    # d 5: 1 - 1.5 < 0 -> 0
    assert value(hinge_loss, 4.0, -1.0, beta=0.3) == pytest.approx(0.0, abs=1e-4)


def test_bco_pair_literal() -> None:
    # beta 0.1, delta 0.2, hc 3, hr -1: -ls(0.3 - 0.2) - ls(-(-0.1 - 0.2)) = -ls(0.1) - ls(0.3) = 1.19875
    assert value(bco_pair_loss, 3.0, -1.0, beta=0.1, delta=0.2) == pytest.approx(1.1988, abs=1e-4)
    # delta as a 0-dim tensor gives the same
    got = value(bco_pair_loss, 3.0, -1.0, beta=0.1, delta=torch.tensor(0.2, dtype=torch.float64))
    assert got == pytest.approx(1.1988, abs=1e-4)


def test_nca_pair_literal() -> None:
    # beta 0.5, hc 2, hr -1: -ls(1) - 0.5 ls(-1) - 0.5 ls(0.5) = 1.20693
    assert value(nca_pair_loss, 2.0, -1.0, beta=0.5) == pytest.approx(1.2069, abs=1e-4)


def test_sppo_hard_literal() -> None:
    # beta 0.5 -> 1/(2 beta) = 1; hc 1.5, hr -0.25: 0.5^2 + 0.75^2 = 0.8125
    assert value(sppo_hard_loss, 1.5, -0.25, beta=0.5) == pytest.approx(0.8125, abs=1e-4)


def test_apo_zero_literal() -> None:
    # beta 0.5, hc 2, hr -1: 1 - sig(1) + sig(-0.5) = 0.64648
    assert value(apo_zero_loss, 2.0, -1.0, beta=0.5) == pytest.approx(0.6465, abs=1e-4)


def test_simpo_literal_with_tokens_and_gamma() -> None:
    # chosen -6 / 4 tokens = -1.5, rejected -12 / 6 tokens = -2; beta 2, gamma 0.5:
    # -ls(2 * 0.5 - 0.5) = -ls(0.5) = 0.47408; the reference is not used
    pol = PairLogps(T(-6.0), T(-12.0), T(4.0), T(6.0))
    assert simpo_loss(pol, None, beta=2.0, gamma=0.5).item() == pytest.approx(0.4741, abs=1e-4)
    ref = PairLogps(T(-100.0), T(3.0))
    assert simpo_loss(pol, ref, beta=2.0, gamma=0.5).item() == pytest.approx(0.4741, abs=1e-4)


def test_soft_literal() -> None:
    # beta 0.5, d 2 -> z 1, p 0.7: -0.7 ls(1) - 0.3 ls(-1) = 0.61326
    got = soft_loss(*pair(1.0, -1.0), beta=0.5, soft_labels=T(0.7)).item()
    assert got == pytest.approx(0.6133, abs=1e-4)


def test_sft_literal() -> None:
    # chosen -12 over 8 tokens: 12 / 8 = 1.5; without counts: 12
    assert sft_loss(PairLogps(T(-12.0), T(-3.0), T(8.0), T(2.0))).item() == pytest.approx(1.5, abs=1e-4)
    assert sft_loss(PairLogps(T(-12.0), T(-3.0))).item() == pytest.approx(12.0, abs=1e-4)
    # the `sft` control loss ignores the rejected output and any reference
    assert get_loss("sft").fn(PairLogps(T(-12.0), T(-99.0), T(8.0), T(2.0))).item() == pytest.approx(1.5, abs=1e-4)


def test_kto_literals() -> None:
    # beta 0.5, z 0.4, lambda_D 2, lambda_U 1.5
    # desirable h = 1.2 (policy -3.8, ref -5):  2 (1 - sig(0.5 (1.2 - 0.4)))  = 2 (1 - sig(0.4)) = 0.80262
    # undesirable h = -0.6 (policy -7.6, ref -7): 1.5 (1 - sig(0.5 (0.4 + 0.6))) = 1.5 (1 - sig(0.5)) = 0.56631
    out = kto_loss(
        T(-3.8, -7.6),
        T(-5.0, -7.0),
        torch.tensor([True, False]),
        beta=0.5,
        reference_point=torch.tensor(0.4, dtype=torch.float64),
        desirable_weight=2.0,
        undesirable_weight=1.5,
    )
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([0.8026, 0.5663], abs=1e-4)


def test_kto_reference_point() -> None:
    # mean(1, -3, 0.5) = -0.5 -> clamped to 0; mean(1, 2, 0) = 1
    assert kto_reference_point(T(1.0, -3.0, 0.5)).item() == pytest.approx(0.0, abs=1e-6)
    x = T(1.0, 2.0, 0.0).requires_grad_()
    z = kto_reference_point(x)
    assert z.shape == () and not z.requires_grad
    assert z.item() == pytest.approx(1.0, abs=1e-6)


def test_bco_reward_mean() -> None:
    # beta 0.1, hc (1, 3), hr (-1, 1): mean(0.1, 0.3, -0.1, 0.1) = 0.1
    ref = PairLogps(T(-5.0, -6.0), T(-7.0, -8.0))
    pol = PairLogps((ref.chosen + T(1.0, 3.0)).requires_grad_(), ref.rejected + T(-1.0, 1.0))
    m = bco_reward_mean(pol, ref, beta=0.1)
    assert m.shape == () and not m.requires_grad
    assert m.item() == pytest.approx(0.1, abs=1e-6)


def test_ranked_literal_k3() -> None:
    # scores (2, 0, 1), h = policy - reference = (1, 0.5, -1), beta 1.
    # ranks (descending score): item0 r1, item2 r2, item1 r3; gains 2^s - 1 = (3, 0, 1);
    # discounts 1/log2(1 + r): r1 1, r2 1/log2(3) = 0.63093, r3 1/log2(4) = 0.5.
    # (0,1): w = 3 * (1 - 0.5)       = 1.5,     term -ls(0.5)
    # (0,2): w = 2 * (1 - 0.63093)   = 0.73814, term -ls(2)
    # (2,1): w = 1 * (0.63093 - 0.5) = 0.13093, term -ls(-1.5)
    # sum(w term) / sum(w) = 0.43374
    pol = T(1.0, 0.5, -1.0)[None] - 4.0
    ref = torch.full((1, 3), -4.0, dtype=torch.float64)
    got = ranked_loss(pol, ref, T(2.0, 0.0, 1.0)[None], beta=1.0)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(0.4337, abs=1e-4)


def test_ranked_partial_tie() -> None:
    # scores (1, 1, 0), h (1, 0.5, -1), beta 1: ranks 1, 2, 3 (stable); gains (1, 1, 0).
    # the tied pair (0,1) contributes nothing.
    # (0,2): w = 1 * (1 - 0.5) = 0.5, term -ls(2); (1,2): w = 1 * (0.63093 - 0.5) = 0.13093, term -ls(1.5)
    # -> 0.14239
    got = ranked_loss(T(1.0, 0.5, -1.0)[None], torch.zeros(1, 3, dtype=torch.float64),
                      T(1.0, 1.0, 0.0)[None], beta=1.0)
    assert got.item() == pytest.approx(0.1424, abs=1e-4)


def test_ranked_all_tied_is_zero_with_finite_grad() -> None:
    pol = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = ranked_loss(pol, torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4), beta=0.5)
    assert out.tolist() == [0.0, 0.0]
    out.sum().backward()
    assert torch.isfinite(pol.grad).all()


def test_ranked_k2_equals_dpo() -> None:
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    s = torch.rand(5, 2, generator=g)
    # put the higher-scored item first or second at random: ranked loss must follow the scores
    chosen_first = s[:, 0] > s[:, 1]
    pol = torch.where(chosen_first[:, None], torch.stack([pc, pr], 1), torch.stack([pr, pc], 1))
    ref = torch.where(chosen_first[:, None], torch.stack([rc, rr], 1), torch.stack([rr, rc], 1))
    got = ranked_loss(pol, ref, s, beta=0.7)
    want = dpo_loss(PairLogps(pc, pr), PairLogps(rc, rr), beta=0.7)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- invariants

D_ONLY = {
    "dpo": (dpo_loss, {"beta": 0.1}),
    "cdpo": (cdpo_loss, {"beta": 0.1, "label_smoothing": 0.15}),
    "robust": (robust_loss, {"beta": 0.1, "label_smoothing": 0.15}),
    "soft": (soft_loss, {"beta": 0.1, "soft_labels": T(0.8)}),
    "hinge": (hinge_loss, {"beta": 0.1}),  # beta d < 1 below
    "ipo": (ipo_loss, {"beta": 0.1}),  # d < 1/(2 beta) = 5 below
}


@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust"])
def test_equal_policy_and_reference_gives_log2(name: str) -> None:
    # d = 0: dpo log 2; cdpo (1-eps) log2 + eps log2 = log 2; robust [(1-eps) - eps] log2 / (1-2eps) = log 2
    fn, hp = D_ONLY[name]
    p = PairLogps(T(-3.0, -40.0), T(-7.0, -2.0))
    assert fn(p, p, **hp).tolist() == pytest.approx([LOG2, LOG2], abs=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_soft_equal_policy_and_reference_gives_log2_for_any_p(p: float) -> None:
    x = PairLogps(T(-3.0), T(-7.0))
    assert soft_loss(x, x, beta=0.3, soft_labels=T(p)).item() == pytest.approx(LOG2, abs=1e-6)


@pytest.mark.parametrize("name", sorted(D_ONLY))
def test_d_only_losses_swap_is_minus_d(name: str) -> None:
    fn, hp = D_ONLY[name]
    pol = PairLogps(T(-10.0), T(-12.0))
    ref = PairLogps(T(-11.0), T(-11.5))  # hc 1, hr -0.5, d 1.5
    swapped = fn(PairLogps(pol.rejected, pol.chosen), PairLogps(ref.rejected, ref.chosen), **hp)
    # a different pair with d = -1.5 (hc 2, hr 3.5)
    minus_d = fn(*pair(2.0, 3.5), **hp)
    torch.testing.assert_close(swapped, minus_d)
    # and the loss does not change when hc and hr move together
    torch.testing.assert_close(fn(pol, ref, **hp), fn(*pair(-4.0, -5.5), **hp))
    assert not torch.allclose(fn(pol, ref, **hp), swapped)


@pytest.mark.parametrize("name", sorted(D_ONLY))
def test_d_only_losses_gradient_pushes_d_up(name: str) -> None:
    fn, hp = D_ONLY[name]
    chosen = T(-10.0, -5.0).requires_grad_()
    rejected = T(-12.0, -3.0).requires_grad_()
    ref = PairLogps(T(-11.0, -4.0), T(-11.5, -4.0))  # d = 1.5 and -3
    fn(PairLogps(chosen, rejected), ref, **hp).sum().backward()
    assert (chosen.grad < 0).all()
    assert (rejected.grad > 0).all()


def test_losses_that_are_not_functions_of_d_alone() -> None:
    # two inputs with the same d = 1 but different (hc, hr) give different values
    cases = {
        bco_pair_loss: {"beta": 0.5, "delta": 0.1},
        nca_pair_loss: {"beta": 0.5},
        sppo_hard_loss: {"beta": 0.5},
        apo_zero_loss: {"beta": 0.5},
    }
    for fn, hp in cases.items():
        a, b = value(fn, 1.0, 0.0, **hp), value(fn, 3.0, 2.0, **hp)
        assert abs(a - b) > 1e-3, fn.__name__
    # simpo: same raw margin, different lengths -> different losses
    short = PairLogps(T(-6.0), T(-8.0), T(2.0), T(2.0))  # means -3, -4
    long = PairLogps(T(-6.0), T(-8.0), T(2.0), T(8.0))  # means -3, -1
    assert abs(simpo_loss(short, None, beta=1.0, gamma=0.0).item()
               - simpo_loss(long, None, beta=1.0, gamma=0.0).item()) > 1e-3
    # kto: same h, label decides the branch
    out = kto_loss(T(1.0, 1.0), T(0.0, 0.0), torch.tensor([True, False]), beta=1.0, reference_point=0.0)
    assert abs(out[0].item() - out[1].item()) > 1e-3


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.35, 0.45])
@pytest.mark.parametrize("d", [-3.0, -0.4, 0.0, 1.0, 6.0])
def test_robust_is_unbiased(eps: float, d: float) -> None:
    # E over flips: (1-eps) robust(d) + eps robust(-d) == dpo(d)
    beta = 0.7
    r_clean = value(robust_loss, d, 0.0, beta=beta, label_smoothing=eps)
    r_flip = value(robust_loss, -d, 0.0, beta=beta, label_smoothing=eps)
    want = math.log1p(math.exp(-beta * d))  # -log sigma(beta d), by hand
    assert (1 - eps) * r_clean + eps * r_flip == pytest.approx(want, abs=1e-9)


def test_robust_rejects_eps_at_or_above_half() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(*pair(1.0, 0.0), beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError):
        robust_loss(*pair(1.0, 0.0), beta=0.1, label_smoothing=0.7)


def test_special_cases_reduce_to_dpo() -> None:
    g = torch.Generator().manual_seed(1)
    pol = PairLogps(*(torch.randn(6, generator=g, dtype=torch.float64) * 4 for _ in range(2)))
    ref = PairLogps(*(torch.randn(6, generator=g, dtype=torch.float64) * 4 for _ in range(2)))
    want = dpo_loss(pol, ref, beta=0.3)
    torch.testing.assert_close(cdpo_loss(pol, ref, beta=0.3, label_smoothing=0.0), want)
    torch.testing.assert_close(robust_loss(pol, ref, beta=0.3, label_smoothing=0.0), want)
    torch.testing.assert_close(soft_loss(pol, ref, beta=0.3, soft_labels=torch.ones(6)), want)


def test_dpo_is_stable_for_large_margins() -> None:
    # -ls(-1000) = 1000 exactly in floating point; log(sigmoid(.)) would give inf
    out = dpo_loss(*pair(0.0, 1000.0), beta=1.0)
    assert torch.isfinite(out).all() and out.item() == pytest.approx(1000.0, abs=1e-4)
    assert dpo_loss(*pair(1000.0, 0.0), beta=1.0).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- shapes


def test_every_loss_returns_per_example_values() -> None:
    B = 3
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    toks = torch.tensor([3.0, 5.0, 7.0])
    pol = PairLogps(r(B), r(B), toks, toks + 1)
    ref = PairLogps(r(B), r(B), toks, toks + 1)
    hp = {
        "dpo": {"beta": 0.1},
        "cdpo": {"beta": 0.1, "label_smoothing": 0.1},
        "robust": {"beta": 0.1, "label_smoothing": 0.1},
        "ipo": {"beta": 0.1},
        "hinge": {"beta": 0.1},
        "bco_pair": {"beta": 0.1, "delta": 0.05},
        "nca_pair": {"beta": 0.1},
        "sppo_hard": {"beta": 0.1},
        "apo_zero": {"beta": 0.1},
        "simpo": {"beta": 2.0, "gamma": 0.5},
        "soft": {"beta": 0.1, "soft_labels": torch.rand(B, generator=g)},
        "sft": {},
        "spo": {"beta": 10.0, "clip": 0.1},  # tests/test_spo.py pins its values
        "d3po": {"beta": 10.0, "clip": 0.1},
        # TRL 1.16's other types (tests/test_losses_trl.py pins their values)
        "exo_pair": {"beta": 0.1, "label_smoothing": 1e-3},
        "apo_down": {"beta": 0.1},
        "discopop": {"beta": 0.1, "discopop_tau": 0.05},
        "sigmoid_norm": {"beta": 0.1},
        "aot": {"beta": 0.1, "label_smoothing": 0.1},
        "aot_unpaired": {"beta": 0.1, "label_smoothing": 0.1},
        # mmalign/losses_more.py (tests/test_losses_more.py pins their values)
        "orpo": {"beta": 0.1},
        "cpo": {"beta": 0.1, "label_smoothing": 0.0, "cpo_alpha": 1.0},
        "cpo_simpo": {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0, "cpo_alpha": 1.0},
        "dpop": {"beta": 0.1, "dpop_lambda": 50.0},
        "mapo": {"beta": 0.1, "mapo_timesteps": 1000},
        "cpl": {"beta": 0.1, "cpl_lambda": 0.5},
    }
    assert set(hp) == set(PAIR_LOSSES)
    for name, kw in hp.items():
        spec = get_loss(name)
        assert spec.kind == "pair"
        assert set(kw) == loss_hyperparameters(name)
        out = spec.fn(pol, ref if spec.needs_reference else None, **kw)
        assert out.shape == (B,), name
    assert sft_loss(pol).shape == (B,)
    kto = get_loss("kto").fn(r(B), r(B), torch.tensor([True, False, True]), beta=0.1, reference_point=0.0)
    assert kto.shape == (B,)
    ranked = get_loss("ranked").fn(r(B, 4), r(B, 4), r(B, 4), beta=0.1)
    assert ranked.shape == (B,)


# --------------------------------------------------------------------------- registry


def test_registry_contents() -> None:
    assert set(LOSSES) == {
        "dpo", "cdpo", "robust", "ipo", "hinge", "bco_pair", "nca_pair",
        "sppo_hard", "apo_zero", "simpo", "soft", "sft", "spo", "d3po", "kto", "ranked",
        "exo_pair", "apo_down", "discopop", "sigmoid_norm", "aot", "aot_unpaired",  # mmalign/losses_trl.py
        "grpo",  # mmalign/losses_grpo.py
        "nft",  # mmalign/losses_nft.py
        "orpo", "cpo", "cpo_simpo", "dpop", "mapo", "cpl",  # mmalign/losses_more.py
    }
    assert all(isinstance(s, LossSpec) for s in LOSSES.values())
    assert get_loss("kto").kind == "unpaired" and get_loss("ranked").kind == "ranked"
    assert [n for n, s in LOSSES.items() if not s.needs_reference] == ["simpo", "sft", "orpo", "cpo", "cpo_simpo",
                                                                        "mapo", "cpl"]
    assert get_loss("dpo").fn is L.dpo_loss


def test_get_loss_unknown_names_the_nearest() -> None:
    with pytest.raises(ValueError) as err:
        get_loss("dpoo")
    msg = str(err.value)
    assert "'dpoo'" in msg and "Did you mean 'dpo'" in msg and "sppo_hard" in msg
    with pytest.raises(ValueError, match="Did you mean 'nca_pair'"):
        get_loss("nca")
    with pytest.raises(ValueError, match="Did you mean 'sppo_hard'"):
        get_loss("spo_hard")


def test_loss_hyperparameters() -> None:
    assert loss_hyperparameters("dpo") == {"beta"}
    assert loss_hyperparameters("cdpo") == {"beta", "label_smoothing"}
    assert loss_hyperparameters("bco_pair") == {"beta", "delta"}
    assert loss_hyperparameters("kto") == {
        "beta", "reference_point", "desirable_weight", "undesirable_weight",
    }
    assert loss_hyperparameters("ranked") == {"beta"}
    with pytest.raises(ValueError):
        loss_hyperparameters("nope")
