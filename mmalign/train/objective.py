"""From policy/reference log-likelihoods to per-example losses and metrics.

The pure losses live in `mmalign.losses`; each `LossSpec` declares what its function takes.
This module supplies it the same way for every loss: it arranges the outputs by data kind
(pairs, unpaired items, ranked lists), passes the declared batch fields, computes the declared
batch statistics (KTO's z, BCO's running delta) over ALL processes through `gather`, reads the
hyperparameters from `LossConfig`, then adds the SFT (RPO) term and per-example weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from mmalign.config import LossConfig
from mmalign.losses import LossSpec, f_divergence_pairs, sft_loss
from mmalign.losses_grpo import step_inputs, step_metrics
from mmalign.losses_trl import ld_pairs, wpo_pair_weights
from mmalign.train.dense import dense_pairs
from mmalign.train.metrics import pair_metrics
from mmalign.types import LogpOutput, PairLogps, PreferenceBatch

Gather = Callable[[Tensor], Tensor]
CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(LossConfig))
# How to ask for a batch field that is missing, where a record column supplies it.
FIELD_HINTS = {"soft_labels": "a 'soft_label' column (preference probability p of chosen)"}


class RunningMean:
    """Mean of every value seen so far (BCO's δ), updated with whole-world batches."""

    def __init__(self) -> None:
        self.mean, self.count = 0.0, 0

    def update(self, batch_mean: float, batch_count: int) -> float:
        self.count += batch_count
        self.mean += (batch_mean - self.mean) * batch_count / self.count
        return self.mean

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


# --------------------------------------------------------------------------- data kinds


def _pair_inputs(cfg: LossConfig, batch: PreferenceBatch, policy: LogpOutput,
                 reference: LogpOutput) -> tuple[PairLogps, PairLogps]:
    """(B,) chosen/rejected of the 2B items, re-scored by `dense_pairs` when loss.dense_gamma > 0
    or by LD-DPO's `ld_pairs` when loss.ld_alpha is set."""
    if cfg.dense_gamma:
        return dense_pairs(batch, policy, reference, cfg.dense_gamma)
    if cfg.ld_alpha is not None:
        return ld_pairs(policy, reference, cfg.ld_alpha)
    return policy.pairs(), reference.pairs()


def _unpaired_inputs(cfg: LossConfig, batch: PreferenceBatch, policy: LogpOutput,
                     reference: LogpOutput) -> tuple[Tensor, Tensor]:
    """(N,) item log-likelihoods."""
    return policy.logps, reference.logps


def _ranked_inputs(cfg: LossConfig, batch: PreferenceBatch, policy: LogpOutput,
                   reference: LogpOutput) -> tuple[Tensor, Tensor]:
    """(B, K) lists of the B*K list-major items."""
    b, k = batch.scores.shape
    return policy.logps.view(b, k), reference.logps.view(b, k)


def _pair_metrics(cfg: LossConfig, batch: PreferenceBatch, policy: PairLogps,
                  reference: PairLogps) -> dict[str, Tensor]:
    return pair_metrics(policy, reference, cfg.beta)


def _unpaired_metrics(cfg: LossConfig, batch: PreferenceBatch, policy: Tensor,
                      reference: Tensor) -> dict[str, Tensor]:
    """Rewards beta (policy - reference) and log-likelihoods of desirable ("chosen") and other items."""
    desirable = batch.desirable
    rewards = cfg.beta * (policy - reference).detach()
    return {"rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable],
            "logps/chosen": policy[desirable], "logps/rejected": policy[~desirable]}


def _ranked_metrics(cfg: LossConfig, batch: PreferenceBatch, policy: Tensor,
                    reference: Tensor) -> dict[str, Tensor]:
    """The best against the worst item of each list, with the pairwise metric names."""
    scores = batch.scores
    best, worst = scores.argmax(-1, keepdim=True), scores.argmin(-1, keepdim=True)
    pick = lambda t, i: t.gather(1, i).squeeze(1)  # noqa: E731
    return pair_metrics(PairLogps(pick(policy, best), pick(policy, worst)),
                        PairLogps(pick(reference, best), pick(reference, worst)), cfg.beta)


@dataclass(frozen=True)
class DataKind:
    """How a batch kind is laid out: inputs(cfg, batch, policy, reference) -> the loss's
    (policy, reference) arguments; metrics(cfg, batch, policy, reference) -> per-example values."""

    inputs: Callable[[LossConfig, PreferenceBatch, LogpOutput, LogpOutput], tuple[Any, Any]]
    metrics: Callable[[LossConfig, PreferenceBatch, Any, Any], dict[str, Tensor]]


DATA_KINDS = {
    "pair": DataKind(_pair_inputs, _pair_metrics),
    "unpaired": DataKind(_unpaired_inputs, _unpaired_metrics),
    "ranked": DataKind(_ranked_inputs, _ranked_metrics),
    "step": DataKind(step_inputs, step_metrics),  # GRPO: whole LogpOutputs (log-probs and transition means)
}


# --------------------------------------------------------------------------- what a spec declares


def loss_hyperparameter_values(spec: LossSpec, cfg: LossConfig) -> dict[str, Any]:
    """{name: getattr(cfg, name)} for the spec's hyperparameters that LossConfig holds (others: fn's default)."""
    return {k: getattr(cfg, k) for k in spec.hyperparameters if k in CONFIG_KEYS}


def batch_fields(spec: LossSpec, batch: PreferenceBatch, loss_name: str) -> dict[str, Tensor]:
    """{field: batch.field} for the spec's declared fields; a missing one is a ValueError."""
    values = {name: getattr(batch, name) for name in spec.fields}  # names checked by LossSpec
    for name, value in values.items():
        if value is None:
            raise ValueError(f"loss '{loss_name}' needs {FIELD_HINTS.get(name, f'batch field {name!r}')}")
    return values


def batch_statistics(spec: LossSpec, hyperparameters: dict[str, Any], policy: Any, reference: Any,
                     gather: Gather, state: RunningMean, mismatched: Tensor | None) -> dict[str, Any]:
    """{keyword: v} for the spec's statistics, v = reduce(gather(local values), hyperparameters);
    a running statistic gives the running mean kept in `state`. mismatched: (N,) log-ratios of
    other items that a statistic declared `mismatched` uses instead of the batch's own, or None."""
    values: dict[str, Any] = {}
    for name, stat in spec.statistics.items():
        local = mismatched if stat.mismatched and mismatched is not None else stat.local(policy, reference)
        world = gather(local.detach())
        value = stat.reduce(world, hyperparameters)
        values[name] = state.update(float(value), world.numel()) if stat.running else value
    return values


def preference_losses(spec: LossSpec, cfg: LossConfig, batch: PreferenceBatch, policy: LogpOutput,
                      reference: LogpOutput, gather: Gather, state: RunningMean,
                      kl_logratios: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example losses (B,) (N, for unpaired batches) and per-example metric values.
    kl_logratios: (N,) policy - reference log-ratios of KTO's mismatched items, or None."""
    if spec.kind != batch.kind:
        raise ValueError(f"loss '{cfg.name}' needs '{spec.kind}' data but the batch is '{batch.kind}'")
    kind = DATA_KINDS[batch.kind]
    pol, ref = kind.inputs(cfg, batch, policy, reference)
    hyperparameters = loss_hyperparameter_values(spec, cfg)
    statistics = batch_statistics(spec, hyperparameters, pol, ref, gather, state, kl_logratios)
    loss_pol, loss_ref = pol, ref
    if spec.f_divergence and spec.needs_reference and cfg.f_divergence_type != "reverse_kl":  # f-DPO
        loss_pol, loss_ref = f_divergence_pairs(pol, ref, cfg.f_divergence_type, cfg.f_alpha_divergence_coef)
    losses = spec.fn(loss_pol, loss_ref if spec.needs_reference else None, **batch_fields(spec, batch, cfg.name),
                     **statistics, **hyperparameters)
    if cfg.sft_weight and batch.kind == "pair":  # RPO: the chosen answers' NLL
        losses = losses + cfg.sft_weight * sft_loss(pol)
    if cfg.use_weighting:  # WPO: every term of a pair times w(c) w(r) (checked: pair data only)
        weights = wpo_pair_weights(policy)
        losses = losses * weights.to(losses.dtype)
    metrics = kind.metrics(cfg, batch, pol, ref)
    if cfg.use_weighting:
        metrics["wpo/weight"] = weights
    for name, stat in spec.statistics.items():
        if stat.metric is not None:
            metrics[stat.metric] = torch.as_tensor(statistics[name]).reshape(1)
    if batch.weights is not None:
        losses = losses * batch.weights.to(losses.dtype)
    for key, values in policy.diagnostics.items():  # e.g. mse of diffusion likelihoods
        metrics[f"{key}/policy"] = values
    for key, values in reference.diagnostics.items():
        metrics[f"{key}/ref"] = values
    metrics["loss"] = losses
    return losses, {k: v.detach() for k, v in metrics.items()}
