"""GRPO for diffusion and flow models (Flow-GRPO, DanceGRPO; METHODS.md C.1, C.2): group-normalised
advantages and the clipped policy-gradient loss on sampled transitions (batch kind "step").

Advantages (flow_grpo `PerPromptStatTracker`, type grpo), rewards R (P prompts, G samples):
    A = (R - mean_group(R)) / (std + eps)
    std = population std (ddof 0) of ALL rewards of the round (global_std, the shipped configs)
          or of the prompt's group; eps = 1e-4.
Several scorers: flow_grpo normalises the weighted sum R = Σ_k w_k R_k (DanceGRPO: per group, ddof 1, eps 1e-8); `per_reward` (GDPO-style)
normalises each reward in its group first, A = Σ_k w_k A_k, then normalises A over the round
(mean 0, ddof-0 std, + eps).

Loss per trained step (item) i, ρ = exp(logp_θ - logp_old), A clipped to ±adv_clip_max:
    L_i = max(-A·ρ, -A·clip(ρ, 1 - ε, 1 + ε)) + β_KL·KL_i
    KL_i = mean_dims((μ_θ - μ_ref)²) / (2·s²)      (Flow-GRPO's code; s = its std_dev_t)
The trainer averages L over the batch's items (= over samples and trained steps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.types import LogpOutput, PreferenceBatch


STD_FLOOR = 1e-4  # Flow-GRPO / DiffusionNFT: A = (R - mean) / (std + 1e-4)


def ragged_group_advantages(rewards: Tensor, groups: Tensor, global_std: bool = True, eps: float = STD_FLOOR,
                            ddof: int = 0) -> Tensor:
    """A (N,) float64 = (R_i - mean_{g(i)}(R)) / (std + eps), groups of any sizes (`PerPromptStatTracker`):
    std with `ddof` of ALL N rewards (global_std) or of the item's group g(i).
    rewards (N,); groups (N,) long, the group (prompt slot) of each item, in any order."""
    r = rewards.double()
    means = torch.zeros_like(r)
    stds = torch.full_like(r, float(r.std(correction=ddof)))
    for g in groups.unique().tolist():
        member = groups == g
        means[member] = r[member].mean()
        if not global_std:
            stds[member] = r[member].std(correction=ddof)
    return (r - means) / (stds + eps)


def _normalise(r: Tensor, global_std: bool, eps: float, ddof: int = 0) -> Tensor:
    """`ragged_group_advantages` of dense groups: r (P, G) float64, group p = row p -> (P, G)."""
    groups = torch.arange(r.shape[0]).repeat_interleave(r.shape[1])
    return ragged_group_advantages(r.flatten(), groups, global_std, eps, ddof).view_as(r)


def group_advantages(rewards: Tensor, weights: list[float] | None = None, global_std: bool = True,
                     per_reward: bool = False, eps: float = STD_FLOOR, ddof: int = 0) -> Tensor:
    """Advantages (P, G) float32 of rewards (K, P, G) of K scorers (module docstring).
    weights: (K,) per scorer, None = all 1; ddof: 0 population std (flow_grpo), 1 torch's unbiased
    `.std()` (DanceGRPO, with eps 1e-8)."""
    r = rewards.double()
    if r.ndim == 2:
        r = r[None]
    w = torch.tensor(weights if weights is not None else [1.0] * r.shape[0], dtype=torch.float64).view(-1, 1, 1)
    if not per_reward:
        return _normalise((w * r).sum(0), global_std, eps, ddof).float()
    combined = (w * torch.stack([_normalise(rk, global_std, eps, ddof) for rk in r])).sum(0)
    return ((combined - combined.mean()) / (combined.std(unbiased=False) + eps)).float()


def kl_term(policy_mean: Tensor, ref_mean: Tensor, scale: Tensor) -> Tensor:
    """KL_i = mean_dims((μ_θ - μ_ref)²) / (2·scale²), (N,)."""
    sq = ((policy_mean.float() - ref_mean.float()) ** 2).mean(dim=tuple(range(1, policy_mean.ndim)))
    return sq / (2 * scale.float() ** 2)


def grpo_loss(policy: LogpOutput, reference: LogpOutput, *, advantages: Tensor, old_logps: Tensor, clip: float,
              kl_beta: float, adv_clip_max: float) -> Tensor:
    """Per-item clipped policy-gradient loss + β_KL·KL (module docstring), (N,).

    policy, reference: step LogpOutputs (logps (N,), transition (μ, s)); advantages, old_logps (N,)."""
    adv = advantages.to(policy.logps.device).float().clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(policy.logps - old_logps.to(policy.logps.device).float())
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    if kl_beta:
        if policy.transition is None or reference.transition is None:
            raise ValueError("loss.kl_beta > 0 needs a step likelihood's transition means (LogpOutput.transition)")
        loss = loss + kl_beta * kl_term(policy.transition[0], reference.transition[0], policy.transition[1])
    return loss


# -- the "step" batch kind (mmalign/train/objective.py DATA_KINDS) ------------------------------
def step_inputs(cfg: Any, batch: PreferenceBatch, policy: LogpOutput,
                reference: LogpOutput) -> tuple[LogpOutput, LogpOutput]:
    """The loss takes the whole LogpOutputs (log-probs and transition means)."""
    return policy, reference


def step_metrics(cfg: Any, batch: PreferenceBatch, policy: LogpOutput, reference: LogpOutput) -> dict[str, Tensor]:
    """Per-item ratio ρ, whether it was clipped, log-ratio to the reference, KL_i, advantage."""
    ratio = torch.exp(policy.logps.detach() - batch.old_logps.to(policy.logps.device).float())
    values = {"grpo/ratio": ratio, "grpo/clipfrac": ((ratio - 1).abs() > cfg.clip).float(),
              "grpo/advantage": batch.advantages.float(), "logps/policy": policy.logps.detach()}
    if policy.transition is not None and reference.transition is not None:
        values["grpo/kl"] = kl_term(policy.transition[0].detach(), reference.transition[0], policy.transition[1])
    return values
