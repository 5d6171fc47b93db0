"""The TRL 1.16 `DPOTrainer` loss types mmalign lacked, and TRL's f-divergence option
(shared/METHODS.md A.1-A.6). Registered in `mmalign.losses.LOSSES` with the older losses.

Same contract as `mmalign.losses`: pure functions of the policy's and the reference's
`PairLogps` and keyword-only hyperparameters, no config reads, no reduction, one value per
example (B,). Notation: u_c = policy.chosen - reference.chosen, u_r likewise for rejected,
delta = u_c - u_r, sigma the logistic function.

`aot` and `aot_unpaired` are batch-level: they sort over the batch they are given, so entry i
depends on the whole batch (this process's micro-batch, as in TRL, which does not gather
across processes either). Their `LossSpec` says so (`batch_level=True`).

The f-divergence option (`f_divergence_pairs`) is not a hyperparameter of these functions: the
trainer applies it to the inputs of every loss whose `LossSpec` has `f_divergence=True` (the
losses built on delta alone), turning each log-ratio u into s(u) so that the loss sees
delta = s(u_c) - s(u_r), exactly where TRL applies it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.types import LogpOutput, PairLogps

__all__ = [
    "F_DIVERGENCES",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "discopop_loss",
    "exo_pair_loss",
    "f_divergence_pairs",
    "f_divergence_score",
    "ld_logps",
    "wpo_pair_weights",
    "wpo_weights",
    "ld_pairs",
    "sigmoid_norm_loss",
]


def _ratios(policy: PairLogps, reference: PairLogps) -> tuple[Tensor, Tensor]:
    """(u_c, u_r), each (B,)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z), as TRL's aot writes it."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


# --------------------------------------------------------------------------- per example


def exo_pair_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float
) -> Tensor:
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, eq. 16), KL(q || [1 - eps, eps]) for K = 2:

    x = beta delta, q_w = sigma(x), q_l = sigma(-x),
    loss = q_w (log sigma(x) - log(1 - eps)) + q_l (log sigma(-x) - log eps).

    eps = label_smoothing must be in (0, 1) (the paper uses 1e-3). Not monotone in delta: its
    minimum is at delta* = log((1 - eps)/eps) / beta. policy, reference: (B,). Returns (B,).
    """
    eps = label_smoothing
    if not 0 < eps < 1:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (EXO uses 1e-3), got {eps}")
    u_c, u_r = _ratios(policy, reference)
    x = beta * (u_c - u_r)
    log_pw, log_pl = math.log1p(-eps), math.log(eps)
    return torch.sigmoid(x) * (F.logsigmoid(x) - log_pw) + torch.sigmoid(-x) * (F.logsigmoid(-x) - log_pl)


def apo_down_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8):

    sigma(beta u_c) + 1 - sigma(beta (u_c - u_r)).

    For chosen outputs worse than the model's own: lowers chosen, and rejected more. (B,) -> (B,).
    """
    u_c, u_r = _ratios(policy, reference)
    return torch.sigmoid(beta * u_c) + (1 - torch.sigmoid(beta * (u_c - u_r)))


def discopop_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, discopop_tau: float
) -> Tensor:
    """DiscoPOP / LRML (Chan et al. 2024, arXiv 2406.08414, eq. 5):

    x = beta delta, m = sigma(x / tau), loss = (1 - m)(-log sigma(x)) + m exp(-x).

    tau = discopop_tau (0.05 in the paper and TRL). Non-monotone and non-convex in delta.
    m exp(-x) is computed as exp(log sigma(x/tau) - x), finite where TRL's exp(-x) overflows
    (x < -88 in fp32); equal to TRL's value elsewhere up to rounding. (B,) -> (B,).
    """
    u_c, u_r = _ratios(policy, reference)
    x = beta * (u_c - u_r)
    m = torch.sigmoid(x / discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(F.logsigmoid(x / discopop_tau) - x)


def sigmoid_norm_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """Length-normalised DPO (LN-DPO; TRL's `sigmoid_norm`), with a reference unlike SimPO:

    -log sigma(beta (u_c / |c| - u_r / |r|)), |y| = the answer's token count (at least 1).

    Where there are no token counts (diffusion, flow) |y| = 1 and this is `dpo`. A reference
    without counts (precomputed) uses the policy's: both score the same answers. (B,) -> (B,).
    """
    u_c, u_r = _ratios(policy, reference)
    n_c = policy.chosen_tokens if policy.chosen_tokens is not None else reference.chosen_tokens
    n_r = policy.rejected_tokens if policy.rejected_tokens is not None else reference.rejected_tokens
    if n_c is not None and n_r is not None:
        u_c, u_r = u_c / n_c.clamp(min=1).to(u_c.dtype), u_r / n_r.clamp(min=1).to(u_r.dtype)
    return -F.logsigmoid(beta * (u_c - u_r))


# --------------------------------------------------------------------------- batch level (AOT)


def aot_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float
) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional preference alignment via optimal
    transport"; TRL's `aot`): sort over the batch, then a smoothed logistic loss,

    a = sort_asc(policy.chosen - policy.rejected), b = sort_asc(reference.chosen - reference.rejected),
    delta_i = a_i - b_i, loss_i = -(1 - eps) log sigma(beta delta_i) - eps log sigma(-beta delta_i).

    eps = label_smoothing. BATCH-LEVEL: entry i is the i-th quantile pair of the batch, not
    example i's loss; it depends on the batch size (a batch of 1 is `cdpo`). Gradients flow
    through the sorted values. (B,) -> (B,).
    """
    a = torch.sort(policy.chosen - policy.rejected, dim=0).values
    b = torch.sort(reference.chosen - reference.rejected, dim=0).values
    return _smoothed_logistic(beta * (a - b), label_smoothing)


def aot_unpaired_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float
) -> Tensor:
    """AOT, unpaired (TRL's `aot_unpaired`): the chosen and the rejected log-ratio distributions
    are aligned by quantile,

    delta_i = sort_asc(u_c)_i - sort_asc(u_r)_i, loss_i as in `aot_loss`.

    BATCH-LEVEL like `aot_loss`. (B,) -> (B,).
    """
    u_c, u_r = _ratios(policy, reference)
    delta = torch.sort(u_c, dim=0).values - torch.sort(u_r, dim=0).values
    return _smoothed_logistic(beta * delta, label_smoothing)


# --------------------------------------------------------------------------- f-divergence


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(u: Tensor, kind: str, alpha: float = 0.5) -> Tensor:
    """s(u) of f-DPO (Wang et al. 2023, "Beyond reverse KL"), the score TRL 1.16 puts in place of
    the log-ratio u (shared/METHODS.md A.6):

    reverse_kl: u; forward_kl: 1 - exp(-u); js_divergence: log 2 + log sigma(u);
    alpha_divergence: (exp((alpha - 1) u) - 1) / (alpha - 1), (alpha - 1) u computed in fp32 and
    clamped to <= 80 (11 in fp16); |alpha - 1| < 1e-6 gives u. u: any shape; same shape back.
    """
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return u
        t = (alpha - 1.0) * u
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"unknown f-divergence {kind!r}; valid: {', '.join(F_DIVERGENCES)}")


def f_divergence_pairs(
    policy: PairLogps, reference: PairLogps, kind: str, alpha: float = 0.5
) -> tuple[PairLogps, PairLogps]:
    """Inputs under which a loss built on delta sees delta = s(u_c) - s(u_r):

    policy' = (s(u_c), s(u_r)), reference' = (0, 0), both with the policy's token counts (so
    `ipo` and `sigmoid_norm` divide s(u) by |y| after the transform, as TRL does).
    """
    u_c, u_r = _ratios(policy, reference)
    tokens_c = policy.chosen_tokens if policy.chosen_tokens is not None else reference.chosen_tokens
    tokens_r = policy.rejected_tokens if policy.rejected_tokens is not None else reference.rejected_tokens
    scored = PairLogps(f_divergence_score(u_c, kind, alpha), f_divergence_score(u_r, kind, alpha),
                       tokens_c, tokens_r)
    zeros = PairLogps(torch.zeros_like(scored.chosen), torch.zeros_like(scored.rejected), tokens_c, tokens_r)
    return scored, zeros


# --------------------------------------------------------------------------- LD-DPO


def ld_logps(token_logps: Tensor, token_mask: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's length-desensitised sequence log-likelihood (Liu et al. 2024; TRL's `ld_alpha`):

    logp(y) = sum_{t <= l_s} log p_t + alpha sum_{t > l_s} log p_t,  l_s = min(|c|, |r|) of the pair,

    positions t counted along the answer-token mask (left or right padding both work).
    token_logps, token_mask: (2B, T), the B chosen rows then the B rejected rows. Returns (2B,).
    alpha = 1 is the plain sum, 0 drops the longer answer's tail.
    """
    mask = token_mask.to(token_logps.dtype)
    position = mask.cumsum(dim=1)
    lengths = mask.sum(dim=1)
    chosen_len, rejected_len = lengths.chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    values = token_logps * mask
    head = (values * ((position > 0) & (position <= shared))).sum(dim=1)
    tail = (values * (position > shared)).sum(dim=1)
    return head + ld_alpha * tail


def ld_pairs(policy: LogpOutput, reference: LogpOutput, ld_alpha: float) -> tuple[PairLogps, PairLogps]:
    """Policy and reference `PairLogps` re-scored with `ld_logps` (token counts unchanged, as TRL
    normalises ipo / sigmoid_norm by the full length). Needs per-token values on both sides."""
    for name, out in (("policy", policy), ("reference", reference)):
        if out.token_logps is None or out.token_mask is None:
            raise ValueError(f"loss.ld_alpha (LD-DPO) needs per-token log-probs of the {name}: use a token "
                             "likelihood (causal_lm, llava) and a reference that is not precomputed")
    scored = []
    for out in (policy, reference):
        values = LogpOutput(ld_logps(out.token_logps, out.token_mask, ld_alpha), policy.tokens)
        scored.append(values.pairs())
    return scored[0], scored[1]


# --------------------------------------------------------------------------- WPO


def wpo_weights(token_logps: Tensor, token_log_sq_mass: Tensor, token_mask: Tensor) -> Tensor:
    """WPO's per-sequence weight (Zhou et al. 2024, arXiv 2406.11827, eq. 2, TRL's `use_weighting`):

    w(y) = exp( (1/|y|) sum_t [log p_t(y_t) - log sum_v p_t(v)^2] ),

    from the policy at temperature 1, detached. token_logps, token_log_sq_mass, token_mask:
    (N, T). Returns (N,); can exceed 1 (when p_t(y_t) > sum_v p_t(v)^2).
    """
    mask = token_mask.to(token_logps.dtype)
    aligned = (token_logps.detach() - token_log_sq_mass.detach()) * mask
    return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))


def wpo_pair_weights(policy: LogpOutput) -> Tensor:
    """w(chosen) * w(rejected) per pair, (B,), from a paired policy output (2B items) that holds
    per-token values and `token_log_sq_mass`. TRL multiplies every loss term of a pair by it."""
    if policy.token_logps is None or policy.token_mask is None or policy.token_log_sq_mass is None:
        raise ValueError("loss.use_weighting (WPO) needs the policy's per-token log-probs and log sum p^2: "
                         "use a token likelihood (causal_lm, llava) with square_mass on")
    chosen, rejected = wpo_weights(policy.token_logps, policy.token_log_sq_mass, policy.token_mask).chunk(2)
    return chosen * rejected
