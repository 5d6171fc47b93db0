"""Preference losses on implicit log-likelihoods (shared/METHODS.md section 1).

Every loss is a pure function: no config reads, no logging, no reduction. It takes
the policy's and the reference's log-likelihoods and its hyperparameters and
returns one value per example. Batch statistics and running state (`kto`'s
reference point z, `bco_pair`'s running mean delta) are computed by the trainer,
all-reduced across processes, and passed in.

Notation (per example): hc = policy.chosen - reference.chosen,
hr = policy.rejected - reference.rejected, d = hc - hr, sigma the logistic function.
`dpo`, `cdpo`, `robust`, `soft`, `hinge` and `ipo` depend on d alone; `bco_pair`,
`nca_pair`, `sppo_hard`, `apo_zero`, `simpo` and `kto` do not.

The trainer picks a loss by name: `get_loss(name)` returns a `LossSpec`, which declares
what the loss needs: its hyperparameters (the keyword-only parameters of its function, read
from the config), the batch fields it reads (`soft`'s soft_labels) and the batch statistics
the trainer gathers for it (`Statistic`: `kto`'s z, `bco_pair`'s delta). The trainer
(mmalign/train/objective.py) supplies them the same way for every loss.

TRL 1.16's other loss types (`exo_pair`, `aot`, `aot_unpaired`, `apo_down`, `discopop`,
`sigmoid_norm`) and its f-divergence option live in `mmalign.losses_trl`; they are registered
here and importable from this module too.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.losses_grpo import grpo_loss
from mmalign.losses_nft import nft_loss
from mmalign.losses_image import IMAGE_TERMS, ImageTermSpec, anchor_loss, image_conditional_loss
from mmalign.losses_more import more_specs
from mmalign.losses_trl import (F_DIVERGENCES, aot_loss, aot_unpaired_loss, apo_down_loss, discopop_loss,
                                exo_pair_loss, f_divergence_pairs, f_divergence_score, sigmoid_norm_loss)
from mmalign.types import PairLogps, PreferenceBatch

__all__ = [
    "F_DIVERGENCES",
    "LOSSES",
    "PAIR_LOSSES",
    "IMAGE_TERMS",
    "BCO_DELTA",
    "ImageTermSpec",
    "KTO_Z",
    "LossSpec",
    "Statistic",
    "anchor_loss",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bco_reward_mean",
    "cdpo_loss",
    "d3po_loss",
    "discopop_loss",
    "dpo_loss",
    "exo_pair_loss",
    "f_divergence_pairs",
    "f_divergence_score",
    "get_loss",
    "grpo_loss",
    "hinge_loss",
    "image_conditional_loss",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "loss_hyperparameters",
    "nca_pair_loss",
    "ranked_loss",
    "robust_loss",
    "sft_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "soft_loss",
    "spo_loss",
    "sppo_hard_loss",
]


def _ratios(policy: PairLogps, reference: PairLogps) -> tuple[Tensor, Tensor]:
    """Log-ratios (hc, hr), each (B,)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _margin(policy: PairLogps, reference: PairLogps) -> Tensor:
    """d = hc - hr, (B,)."""
    hc, hr = _ratios(policy, reference)
    return hc - hr


# --------------------------------------------------------------------------- pairwise, d only


def dpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta d).

    policy, reference: (B,) chosen/rejected log-likelihoods. Returns (B,).
    """
    return -F.logsigmoid(beta * _margin(policy, reference))


def cdpo_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float
) -> Tensor:
    """Conservative DPO: -(1-eps) log sigma(beta d) - eps log sigma(-beta d).

    label_smoothing = eps, the assumed probability that a label is flipped. Returns (B,).
    """
    z = beta * _margin(policy, reference)
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def robust_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float
) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 8), unbiased under label flips of rate eps:

    [(1-eps)(-log sigma(beta d)) - eps(-log sigma(-beta d))] / (1 - 2 eps).

    Its expectation over labels flipped with probability eps equals the clean DPO
    loss. Requires 0 <= eps < 0.5. Returns (B,).
    """
    eps = label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {eps}")
    z = beta * _margin(policy, reference)
    return ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)


def ipo_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): (d - 1/(2 beta))^2.

    As in TRL, d is computed from length-averaged log-likelihoods (`PairLogps.mean()`);
    where there are no token counts (diffusion) the values are used as they are. A
    reference without token counts (e.g. precomputed) is averaged with the policy's
    counts: both score the same answers. Returns (B,).
    """
    d = _margin(*_length_averaged(policy, reference))
    return (d - 1 / (2 * beta)) ** 2


def hinge_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 - beta d). Returns (B,)."""
    return torch.relu(1 - beta * _margin(policy, reference))


def soft_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, soft_labels: Tensor
) -> Tensor:
    """Soft-label DPO: -p log sigma(beta d) - (1-p) log sigma(-beta d).

    soft_labels = p, (B,), the probability in [0, 1] that chosen is preferred
    (e.g. from a scorer). p = 1 gives `dpo`. Returns (B,).
    """
    z = beta * _margin(policy, reference)
    p = soft_labels.to(z.dtype)
    return -p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z)


# --------------------------------------------------------------------------- pairwise, not d only


def bco_pair_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, delta: float | Tensor
) -> Tensor:
    """Pairwise BCO (Jung et al. 2024): -log sigma(beta hc - delta) - log sigma(-(beta hr - delta)).

    delta: float or 0-dim tensor, the running mean of the implicit rewards kept by the
    trainer (fed by `bco_reward_mean`, all-reduced). Returns (B,).
    """
    hc, hr = _ratios(policy, reference)
    return -F.logsigmoid(beta * hc - delta) - F.logsigmoid(-(beta * hr - delta))


def nca_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """Pairwise NCA (Chen et al. 2024): -log sigma(beta hc) - 1/2 log sigma(-beta hc) - 1/2 log sigma(-beta hr).

    Returns (B,).
    """
    hc, hr = _ratios(policy, reference)
    return (
        -F.logsigmoid(beta * hc)
        - 0.5 * F.logsigmoid(-beta * hc)
        - 0.5 * F.logsigmoid(-beta * hr)
    )


def sppo_hard_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """SPPO, hard labels (Wu et al. 2024): (hc - 1/(2 beta))^2 + (hr + 1/(2 beta))^2. Returns (B,)."""
    hc, hr = _ratios(policy, reference)
    return (hc - 1 / (2 * beta)) ** 2 + (hr + 1 / (2 * beta)) ** 2


def apo_zero_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): 1 - sigma(beta hc) + sigma(beta hr). Returns (B,)."""
    hc, hr = _ratios(policy, reference)
    return 1 - torch.sigmoid(beta * hc) + torch.sigmoid(beta * hr)


def simpo_loss(
    policy: PairLogps, reference: PairLogps | None = None, *, beta: float, gamma: float
) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free: -log sigma(beta (a_c - a_r) - gamma).

    a = `policy.mean()`: mean token log-prob (the sums themselves where there are no
    token counts). gamma: target reward margin. `reference` is ignored. Returns (B,).
    """
    a = policy.mean()
    return -F.logsigmoid(beta * (a.chosen - a.rejected) - gamma)


def sft_loss(policy: PairLogps) -> Tensor:
    """RPO / SFT term (Pang et al. 2024): NLL of the chosen output, averaged over its tokens.

    -policy.chosen / chosen_tokens, or -policy.chosen where there are no token counts.
    The trainer adds alpha * this to a pairwise loss. Returns (B,).
    """
    if policy.chosen_tokens is None:
        return -policy.chosen
    return -policy.chosen / policy.chosen_tokens.clamp(min=1).to(policy.chosen.dtype)


def sft_only_loss(policy: PairLogps, reference: PairLogps | None = None) -> Tensor:
    """Supervised fine-tuning on the chosen outputs alone (`loss.name: sft`), the control
    every preference run should be compared with. Same value as `sft_loss`. Returns (B,)."""
    return sft_loss(policy)


# --------------------------------------------------------------------------- step-aware (SPO, D3PO)


def spo_loss(policy: PairLogps, reference: PairLogps, *, beta: float, clip: float) -> Tensor:
    """SPO (Liang et al. 2024), on sampler transitions x_t -> x_{t-1} (mmalign/modalities/step.py):

    -log sigma(beta (log clip(r_c, 1-eps, 1+eps) - log clip(r_r, 1-eps, 1+eps))), r = exp(policy - reference),

    eps = clip (0: no clipping, then this is `dpo_loss`). Clipping r equals clamping log r to
    [log(1-eps), log(1+eps)]: no gradient once a ratio leaves the band. The transition
    log-likelihoods are means over dimensions: beta 10, eps 0.1 are tuned for that. Returns (B,).
    """
    hc, hr = _ratios(policy, reference)
    if clip > 0:
        if clip >= 1:
            raise ValueError(f"spo/d3po clip must be in [0, 1), got {clip}")
        low, high = math.log1p(-clip), math.log1p(clip)
        hc, hr = hc.clamp(low, high), hr.clamp(low, high)
    return -F.logsigmoid(beta * (hc - hr))


def d3po_loss(policy: PairLogps, reference: PairLogps, *, beta: float, clip: float) -> Tensor:
    """D3PO (Yang et al. 2024): every step of the preferred trajectory against the other
    trajectory's step at the same t, -log sigma(beta (log clip(r_c) - log clip(r_r))) as the D3PO
    reference code clips its ratios (clip 0: the paper's unclipped per-step DPO). The same
    formula as `spo_loss`; the methods differ in their data (per-trajectory labels). Returns (B,)."""
    return spo_loss(policy, reference, beta=beta, clip=clip)


def _length_averaged(policy: PairLogps, reference: PairLogps) -> tuple[PairLogps, PairLogps]:
    if reference.chosen_tokens is None and policy.chosen_tokens is not None:
        reference = PairLogps(
            reference.chosen, reference.rejected, policy.chosen_tokens, policy.rejected_tokens
        )
    return policy.mean(), reference.mean()


# --------------------------------------------------------------------------- unpaired (KTO)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float,
    reference_point: float | Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8), unpaired items with binary labels.

    policy_logps, reference_logps: (N,); desirable: (N,) bool. With h = policy - reference
    and z = reference_point (0-dim, detached, already all-reduced by the trainer):
    desirable items: lambda_D (1 - sigma(beta (h - z)));
    undesirable items: lambda_U (1 - sigma(beta (z - h))). Returns (N,).
    """
    h = policy_logps - reference_logps
    desirable = desirable.to(torch.bool)
    good = desirable_weight * (1 - torch.sigmoid(beta * (h - reference_point)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - h)))
    return torch.where(desirable, good, bad)


def kto_reference_point(logratios: Tensor) -> Tensor:
    """KTO's reference point z = max(0, mean(logratios)), detached, 0-dim.

    logratios: (M,) policy - reference log-likelihoods of the WHOLE world batch: the
    trainer gathers them from every process first (clamping per process and then
    averaging would not equal the single-process value). An empty input gives 0.
    """
    if logratios.numel() == 0:
        return logratios.new_zeros(())
    return logratios.detach().float().mean().clamp(min=0).to(logratios.dtype)


def bco_reward_mean(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """Mean of the implicit rewards cat(beta hc, beta hr), 0-dim, detached.

    The batch statistic the trainer all-reduces and feeds into the running mean delta
    of `bco_pair_loss`.
    """
    hc, hr = _ratios(policy, reference)
    return (beta * torch.cat([hc, hr])).detach().mean()


# --------------------------------------------------------------------------- ranked lists


def ranked_loss(
    policy_logps: Tensor, reference_logps: Tensor, scores: Tensor, *, beta: float
) -> Tensor:
    """RankDPO (Karthik et al. 2024): DCG-weighted pairwise DPO over ranked lists.

    policy_logps, reference_logps, scores: (B, K). With h = policy - reference, for every
    ordered pair (i, j) with s_i > s_j (ties contribute nothing):
    term_ij = -log sigma(beta (h_i - h_j)),
    w_ij = |g_i - g_j| * |1/log2(1 + r_i) - 1/log2(1 + r_j)|, gain g = 2^s - 1,
    r = 1-based rank in the list sorted by score, descending (ties in stable order).
    Per list: sum(w term) / sum(w), 0 where sum(w) = 0 (all tied).
    For K = 2 with distinct scores this is `dpo_loss`. Returns (B,).
    """
    h = policy_logps - reference_logps
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=h.dtype)
    ranks = torch.empty_like(h).scatter_(-1, order, positions.expand_as(h).contiguous())
    gain = torch.exp2(scores.to(h.dtype)) - 1
    discount = 1 / torch.log2(1 + ranks)
    weight = (gain[:, :, None] - gain[:, None, :]).abs() * (
        discount[:, :, None] - discount[:, None, :]
    ).abs()
    weight = weight * (scores[:, :, None] > scores[:, None, :]).to(h.dtype)
    term = -F.logsigmoid(beta * (h[:, :, None] - h[:, None, :]))
    total = weight.sum(dim=(1, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, (weight * term).sum(dim=(1, 2)) / safe, torch.zeros_like(total))


# --------------------------------------------------------------------------- registry


def _item_logratios(policy: Tensor, reference: Tensor) -> Tensor:
    """h = policy - reference, (N,), detached."""
    return (policy - reference).detach()


def _pair_logratios(policy: PairLogps, reference: PairLogps) -> Tensor:
    """cat(hc, hr), (2B,), detached."""
    return torch.cat(_ratios(policy, reference)).detach()


def _bco_batch_mean(world: Tensor, hyperparameters: Mapping[str, Any]) -> float:
    """mean(beta cat(hc, hr)) of the world batch, world = cat(hc, hr) gathered (`bco_reward_mean`)."""
    half = world.shape[0] // 2
    rewards = PairLogps(world[:half], world[half:])
    zeros = PairLogps(torch.zeros_like(world[:half]), torch.zeros_like(world[half:]))
    return float(bco_reward_mean(rewards, zeros, beta=hyperparameters["beta"]))


def _kto_z(world: Tensor, hyperparameters: Mapping[str, Any]) -> Tensor:
    """z = max(0, mean(world)), world = h of every process (`kto_reference_point`)."""
    return kto_reference_point(world)


@dataclass(frozen=True)
class Statistic:
    """A batch statistic v a loss takes as a keyword, computed by the trainer over ALL processes:

    v = reduce(gather(local(policy, reference)), hyperparameters).

    local: (M,) detached values of this process's items, from the loss's own inputs;
    gather concatenates them over processes; reduce -> float or 0-dim tensor.
    running: the loss gets the running mean of every v so far, weighted by world.numel()
    (BCO's delta), not v. mismatched: the trainer may give the local values of other items
    instead (KTO's mismatched (prompt, other completion) log-ratios). metric: v is logged
    under this name (None: not logged).
    """

    local: Callable[[Any, Any], Tensor]
    reduce: Callable[[Tensor, Mapping[str, Any]], float | Tensor]
    running: bool = False
    mismatched: bool = False
    metric: str | None = None


BCO_DELTA = Statistic(_pair_logratios, _bco_batch_mean, running=True)
KTO_Z = Statistic(_item_logratios, _kto_z, mismatched=True, metric="kl")

KINDS = ("pair", "unpaired", "ranked", "step", "rewarded")
BATCH_FIELDS = frozenset(f.name for f in dataclasses.fields(PreferenceBatch))


@dataclass(frozen=True)
class LossSpec:
    """A loss and what the trainer must supply to it:

    fn(policy, reference, **batch fields, **statistics, **hyperparameters) -> (B,).

    kind: the data it takes: "pair" (policy, reference: PairLogps), "unpaired" ((N,) item
    log-likelihoods), "ranked" ((B, K) lists), "step" (whole `LogpOutput`s of sampled
    transitions: grpo) or "rewarded" (nft: trained by mmalign/train/nft.py on the model's
    predictions, not on log-likelihoods). needs_reference: False passes reference=None
    (simpo, sft). fields: `PreferenceBatch` attributes passed under their own name (soft's
    soft_labels, kto's desirable labels, ranked's scores). statistics: keyword -> `Statistic`
    (bco_pair's delta, kto's reference_point z). `hyperparameters`: the other keyword-only
    parameters of fn, read from the `LossConfig` fields of the same name.
    f_divergence: the loss depends on the reference only through delta = u_c - u_r, so
    `loss.f_divergence_type` applies (the trainer passes `f_divergence_pairs` instead of the raw
    pairs; `sft`, which has no reference, accepts it and is unaffected, as in TRL); others refuse it. batch_level: entry i depends on the whole batch given (aot sorts
    over it); the trainer passes this process's micro-batch as TRL does (no cross-process
    gather), so values depend on the per-process batch size and per-pair weighting is refused.
    """

    fn: Callable[..., Tensor]
    kind: str
    needs_reference: bool = True
    fields: tuple[str, ...] = ()
    statistics: Mapping[str, Statistic] = field(default_factory=dict)
    f_divergence: bool = False
    batch_level: bool = False

    def __post_init__(self) -> None:
        params = inspect.signature(self.fn).parameters
        if self.kind not in KINDS:
            raise ValueError(f"loss kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in self.fields:
            if name not in BATCH_FIELDS:
                raise ValueError(f"batch field {name!r} is not one of {', '.join(sorted(BATCH_FIELDS))}")
        for name in (*self.fields, *self.statistics):
            if name not in params:
                raise ValueError(f"{self.fn.__name__} has no parameter {name!r}")
        if sum(s.running for s in self.statistics.values()) > 1:
            raise ValueError("a loss takes at most one running statistic (the trainer keeps one running mean)")

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """Keyword-only parameters of fn that are neither batch fields nor statistics, in order."""
        supplied = {*self.fields, *self.statistics}
        return tuple(n for n in _keyword_only(self.fn) if n not in supplied)


def _keyword_only(fn: Callable[..., Tensor]) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, "pair", f_divergence=True),
    "cdpo": LossSpec(cdpo_loss, "pair", f_divergence=True),
    "robust": LossSpec(robust_loss, "pair", f_divergence=True),
    "ipo": LossSpec(ipo_loss, "pair", f_divergence=True),
    "hinge": LossSpec(hinge_loss, "pair", f_divergence=True),
    "bco_pair": LossSpec(bco_pair_loss, "pair", statistics={"delta": BCO_DELTA}),
    "nca_pair": LossSpec(nca_pair_loss, "pair"),
    "sppo_hard": LossSpec(sppo_hard_loss, "pair"),
    "apo_zero": LossSpec(apo_zero_loss, "pair"),
    "simpo": LossSpec(simpo_loss, "pair", needs_reference=False),
    "soft": LossSpec(soft_loss, "pair", fields=("soft_labels",), f_divergence=True),
    "sft": LossSpec(sft_only_loss, "pair", needs_reference=False, f_divergence=True),  # reads the policy only
    "spo": LossSpec(spo_loss, "pair"),
    "d3po": LossSpec(d3po_loss, "pair"),
    "kto": LossSpec(kto_loss, "unpaired", fields=("desirable",), statistics={"reference_point": KTO_Z}),
    "ranked": LossSpec(ranked_loss, "ranked", fields=("scores",)),
    # policy gradients on sampled transitions (mmalign/losses_grpo.py)
    "grpo": LossSpec(grpo_loss, "step", fields=("advantages", "old_logps")),
    # DiffusionNFT: rewarded samples of online `rewards` rounds; trained by mmalign/train/nft.py
    "nft": LossSpec(nft_loss, "rewarded", fields=("optimality",)),
    # TRL 1.16's other types (mmalign/losses_trl.py)
    "exo_pair": LossSpec(exo_pair_loss, "pair", f_divergence=True),
    "apo_down": LossSpec(apo_down_loss, "pair"),
    "discopop": LossSpec(discopop_loss, "pair", f_divergence=True),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, "pair", f_divergence=True),
    "aot": LossSpec(aot_loss, "pair", batch_level=True),
    "aot_unpaired": LossSpec(aot_unpaired_loss, "pair", batch_level=True),
}
LOSSES.update(more_specs(LossSpec))  # ORPO, CPO, CPO-SimPO, DPOP, MaPO, CPL (mmalign/losses_more.py)

# The subset that takes (policy: PairLogps, reference: PairLogps).
PAIR_LOSSES: dict[str, LossSpec] = {k: v for k, v in LOSSES.items() if v.kind == "pair"}


def get_loss(name: str) -> LossSpec:
    """The `LossSpec` registered under `name`; an unknown name is a ValueError naming it."""
    try:
        return LOSSES[name]
    except KeyError:
        valid = sorted(LOSSES)
        close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown loss {name!r}; valid losses: {', '.join(valid)}.{hint}"
        ) from None


def loss_hyperparameters(name: str) -> set[str]:
    """Every keyword-only parameter of the loss `name` (e.g. {"beta"} for dpo, {"beta", "delta"}
    for bco_pair): its `LossSpec.hyperparameters` plus the fields and statistics passed by keyword."""
    return set(_keyword_only(get_loss(name).fn))
