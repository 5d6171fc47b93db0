"""Losses beyond TRL's DPOTrainer (shared/METHODS.md B.1-B.4, B.6): ORPO, CPO / CPO-SimPO, DPOP,
MaPO and CPL. Registered in `mmalign.losses.LOSSES` (through `more_specs`) with the others.

Same contract as `mmalign.losses`: pure functions of the policy's (and, for DPOP, the
reference's) `PairLogps` and keyword-only hyperparameters read from `LossConfig`, no reduction,
one value per example (B,). Notation: pc, pr the policy's log-likelihoods of chosen and rejected
(sums over answer tokens; mmalign's -0.5 mse for diffusion / flow; the step likelihood of one
sampler transition for `sd_spo` / `sdxl_spo`), a = mean token log-prob (`PairLogps.mean()`),
u = policy - reference, sigma the logistic function. NLL(chosen) = `sft_loss` (a per-example mean
over the chosen answer's tokens).

Not every loss means something for every likelihood. `SCOPES` names the likelihood kinds each of
these applies to ("tokens": text and VLM families; "elbo": diffusion / flow / audio ELBO;
"step": SPO / D3PO transitions) and `check_scope` refuses the others at config load:
ORPO and CPO need token probabilities (an odds ratio p/(1-p) of a mean token probability; an
NLL averaged over tokens), MaPO needs the ELBO's mse, CPL an exact action log-likelihood.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.types import PairLogps

__all__ = ["SCOPES", "check_scope", "cpl_loss", "cpo_loss", "cpo_simpo_loss", "dpop_loss", "likelihood_kind",
           "log1mexp", "mapo_loss", "mapo_ratio_term", "more_specs", "orpo_log_odds", "orpo_loss"]

LN2 = math.log(2.0)


def _nll(policy: PairLogps) -> Tensor:
    """NLL of the chosen answer, a mean over its tokens (`mmalign.losses.sft_loss`), (B,)."""
    if policy.chosen_tokens is None:
        return -policy.chosen
    return -policy.chosen / policy.chosen_tokens.clamp(min=1).to(policy.chosen.dtype)


def _smoothed(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# --------------------------------------------------------------------------- ORPO


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, stable: log1p(-e^x) for x < -ln 2, log(-expm1(x)) otherwise."""
    return torch.where(x < -LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(policy: PairLogps) -> Tensor:
    """ORPO's log odds ratio (Hong et al. 2024, eq. 4-7), in float32:

    LO = (a_c - a_r) - (log(1 - e^{a_c}) - log(1 - e^{a_r})),   a = mean token log-prob.

    a is clamped to <= -1e-6 (a = 0, a token probability of exactly 1, makes log(1 - e^a) = -inf).
    Swapping chosen and rejected negates LO. Returns (B,)."""
    a = policy.mean()
    ac, ar = a.chosen.float().clamp(max=-1e-6), a.rejected.float().clamp(max=-1e-6)
    return (ac - ar) - (log1mexp(ac) - log1mexp(ar))


def orpo_loss(policy: PairLogps, reference: PairLogps | None = None, *, beta: float) -> Tensor:
    """ORPO (Hong et al. 2024, eq. 6), reference-free: NLL(chosen) - lambda log sigma(LO), lambda = beta
    (TRL's name; the paper's alpha; TRL default 0.1).

    NLL(chosen) is a mean over the chosen ANSWER tokens per example; TRL's ORPOTrainer and the
    original code average over the prompt AND answer tokens of the whole batch (the intended
    difference; the odds-ratio term is the same). `reference` is ignored. Returns (B,)."""
    return _nll(policy) - beta * F.logsigmoid(orpo_log_odds(policy)).to(policy.chosen.dtype)


# --------------------------------------------------------------------------- CPO


def cpo_loss(policy: PairLogps, reference: PairLogps | None = None, *, beta: float, label_smoothing: float,
             cpo_alpha: float) -> Tensor:
    """CPO (Xu et al. 2024, eq. 3; TRL's CPOTrainer `sigmoid`), reference-free:

    -(1-eps) log sigma(beta (pc - pr)) - eps log sigma(-beta (pc - pr)) + cpo_alpha NLL(chosen),

    pc, pr summed log-likelihoods, eps = label_smoothing (0 in CPO), cpo_alpha = 1 (TRL default).
    `reference` is ignored. Returns (B,)."""
    return _smoothed(beta * (policy.chosen - policy.rejected), label_smoothing) + cpo_alpha * _nll(policy)


def cpo_simpo_loss(policy: PairLogps, reference: PairLogps | None = None, *, beta: float, gamma: float,
                   label_smoothing: float, cpo_alpha: float) -> Tensor:
    """CPO-SimPO (TRL's CPOTrainer `simpo`): SimPO's margin term plus CPO's NLL,

    -(1-eps) log sigma(beta (a_c - a_r) - gamma) - eps log sigma(-(beta (a_c - a_r) - gamma)) + cpo_alpha NLL(chosen),

    a = mean token log-prob, gamma the target margin (TRL's simpo_gamma, default 0.5; mmalign's
    loss.gamma defaults to 0). Returns (B,)."""
    a = policy.mean()
    return _smoothed(beta * (a.chosen - a.rejected) - gamma, label_smoothing) + cpo_alpha * _nll(policy)


# --------------------------------------------------------------------------- DPOP


def dpop_loss(policy: PairLogps, reference: PairLogps, *, beta: float, dpop_lambda: float) -> Tensor:
    """DPO-Positive (Pal et al. 2024, "Smaug", eq. 3): -log sigma(beta [(u_c - u_r) - lambda max(0, -u_c)]).

    The penalty sits inside sigma and grows as the policy's chosen log-likelihood falls below the
    reference's (u_c < 0); for u_c >= 0 this is `dpo_loss`. u uses the summed log-likelihoods, so
    with lambda = 50 a 0.02-nat drop of the chosen costs 1 nat of margin. Returns (B,)."""
    u_c = policy.chosen - reference.chosen
    u_r = policy.rejected - reference.rejected
    return -F.logsigmoid(beta * ((u_c - u_r) - dpop_lambda * torch.relu(-u_c)))


# --------------------------------------------------------------------------- MaPO


def _g(x: Tensor) -> Tensor:
    """G(x) = x / (e^x - 1), G(0) = 1 (1 - x/2 near 0): decreasing in x."""
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2, safe / torch.expm1(safe))


def mapo_ratio_term(policy: PairLogps) -> Tensor:
    """MaPO's margin LO = G(s m_w) - G(s m_l), s = 0.5, m = mean (pred - target)^2 (Hong et al.,
    mapo-t2i/mapo utils.py::compute_loss, snr_value 0.5). In mmalign units logp = -0.5 m, so
    s m = -logp exactly and LO = G(-logp_w) - G(-logp_l). Returns (B,), float32."""
    return _g(-policy.chosen.float()) - _g(-policy.rejected.float())


def mapo_loss(policy: PairLogps, reference: PairLogps | None = None, *, beta: float,
              mapo_timesteps: int) -> Tensor:
    """MaPO (Hong et al. 2024), reference-free, for the diffusion / flow ELBO:

    MaPO's  L = m_w - beta log sigma(T [G(s m_w) - G(s m_l)]),  G(x) = x/(e^x - 1), s = 0.5,
    in mmalign's units (logp = -0.5 m, so m_w = -2 logp_w and s m = -logp):
            L = -2 logp_w - beta log sigma(T [G(-logp_w) - G(-logp_l)]),

    T = mapo_timesteps (the scheduler's num_train_timesteps, 1000), beta = MaPO's beta (0.1).
    The first term is 2x mmalign's image "NLL" (-logp_w): it is MaPO's mean mse of the chosen.
    The pair shares one timestep and one noise (mmalign's draw does that for every pair).
    `reference` is ignored. Returns (B,)."""
    margin = mapo_timesteps * mapo_ratio_term(policy)
    return (-2 * policy.chosen) - beta * F.logsigmoid(margin).to(policy.chosen.dtype)


# --------------------------------------------------------------------------- CPL


def cpl_loss(policy: PairLogps, reference: PairLogps | None = None, *, beta: float, cpl_lambda: float) -> Tensor:
    """CPL (Hejna et al. 2024, eq. 5 with the conservative bias; jhejna/cpl biased_bce_with_logits):

    -log sigma(alpha S(c) - lambda alpha S(r)),   alpha = beta, lambda = cpl_lambda in (0, 1],

    S the policy's log-likelihood of a segment (no reference). lambda < 1 down-weights the
    rejected segment (the conservative bias; CPL's configs use alpha 0.1, lambda 0.5). Not a
    function of S(c) - S(r) unless lambda = 1. In mmalign a segment is what one record scores:
    one SPO / D3PO sampler transition (the step likelihood, a mean over latent dims), or a whole
    answer for text (a sum over its tokens). Returns (B,)."""
    return -F.logsigmoid(beta * policy.chosen - cpl_lambda * beta * policy.rejected)


# --------------------------------------------------------------------------- registry and scope

# likelihood kinds each loss applies to, and why (the losses not named here apply to every kind)
SCOPES: dict[str, tuple[tuple[str, ...], str]] = {
    "orpo": (("tokens",), "its odds ratio and NLL are over token probabilities (text / VLM families)"),
    "cpo": (("tokens",), "its NLL is a token mean (text / VLM families)"),
    "cpo_simpo": (("tokens",), "its margin and NLL are token means (text / VLM families)"),
    "mapo": (("elbo",), "it is defined on the diffusion / flow ELBO's mse (image or audio families, "
                        "not sd_spo / sdxl_spo)"),
    "cpl": (("tokens", "step"), "it needs an action log-likelihood: tokens, or the SPO / D3PO step "
                                "likelihood (sd_spo / sdxl_spo)"),
}


def likelihood_kind(family: Any) -> str:
    """"step" (SPO / D3PO transitions), "tokens" (text, vlm) or "elbo" (image, audio) for a `Family`."""
    if family.step:
        return "step"
    return "tokens" if family.kind in ("text", "vlm") else "elbo"


def check_scope(names: Sequence[str], modality: str) -> str | None:
    """A one-line reason why loss `names` cannot train `modality`, or None when they can."""
    scoped = [n for n in names if n in SCOPES]
    if not scoped:
        return None
    from mmalign.families import get_family

    kind = likelihood_kind(get_family(modality))
    for name in scoped:
        kinds, why = SCOPES[name]
        if kind not in kinds:
            return f"loss '{name}' does not apply to modality '{modality}' ({kind} likelihood): {why}"
    return None


def more_specs(spec: Callable[..., Any]) -> dict[str, Any]:
    """The `LossSpec`s of this module, built with `mmalign.losses.LossSpec` (passed in: this module
    does not import mmalign.losses, which imports it)."""
    return {
        "orpo": spec(orpo_loss, "pair", needs_reference=False),
        "cpo": spec(cpo_loss, "pair", needs_reference=False),
        "cpo_simpo": spec(cpo_simpo_loss, "pair", needs_reference=False),
        "dpop": spec(dpop_loss, "pair"),
        "mapo": spec(mapo_loss, "pair", needs_reference=False),
        "cpl": spec(cpl_loss, "pair", needs_reference=False),
    }
