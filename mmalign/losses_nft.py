"""DiffusionNFT's loss and its advantage weights (Zheng et al. 2509.16117; METHODS.md C.3;
`NVlabs/DiffusionNFT` @24af555 `scripts/train_nft_sd3.py` l.862-960, `return_decay`).

Flow convention: x_t = (1 - t)·x0 + t·ε, velocity v = ε - x0, so x0 = x_t - t·v. UNet families
are brought into it by `ElboObjective.flow_view` (x̂0 and ε̂ of their ε / v / x0 prediction).

Per training sample, with r in [0, 1] its optimality weight and β the NFT β:

    v⁺ = β·v_θ + (1 - β)·v_old,          v⁻ = (1 + β)·v_old - β·v_θ        (v_old stop-grad)
    x̂0^± = x_t - t·v^±
    L^± = mean_dims((x̂0^± - x0)²) / sg(clip(mean_dims|x̂0^± - x0|, min=1e-5))    (adaptive weight)
    L   = A_max·(r·L⁺ + (1 - r)·L⁻)/β + β_KL·mean_dims((v_θ - v_ref)²)

(the trainer averages L over the batch). Pure functions: no config, no logging.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmalign.losses_grpo import ragged_group_advantages

WEIGHT_FLOOR = 1e-5  # the official clip of the adaptive weight


def nft_advantages(rewards: Tensor, groups: Tensor, global_std: bool, adv_clip_max: float) -> Tensor:
    """A (N,) float64 = clip(`ragged_group_advantages`(R), ±adv_clip_max): (R - mean_group(R)) /
    (std + 1e-4), std the population std (ddof 0) of ALL rewards (global_std) or of the item's group.
    rewards (N,), groups (N,) long: the prompt slot of each sample."""
    return ragged_group_advantages(rewards, groups, global_std).clamp(-adv_clip_max, adv_clip_max)


def optimality_weights(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = clip(A / A_max / 2 + 0.5, 0, 1); e.g. A_max 5: A = -5, 0, 2.5, 7 -> 0, 0.5, 0.75, 1."""
    return (advantages / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def _x0_loss(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """(N,) mean_dims((x̂0 - x0)²) / sg(clip(mean_dims|x̂0 - x0|, 1e-5)); the weight in float64, so the
    loss is float64 (as the official)."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=WEIGHT_FLOOR)
    return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)


def nft_loss(x_t: Tensor, t: Tensor, x0: Tensor, v_theta: Tensor, v_old: Tensor, optimality: Tensor,
             v_ref: Tensor | None = None, *, beta: float, adv_clip_max: float = 5.0, kl_beta: float) -> Tensor:
    """Per-sample DiffusionNFT loss (N,) (module docstring).

    x_t, x0, v_theta, v_old, v_ref: (N, ...) float, the same shape (any layout: FLUX's packed
    tokens too); t: (N,) flow time in (0, 1]; optimality: (N,) r in [0, 1]. v_old is
    detached here; v_ref is needed when kl_beta > 0 (None: no KL term)."""
    if kl_beta and v_ref is None:
        raise ValueError("nft_loss: kl_beta > 0 needs v_ref")
    v_old = v_old.detach()
    tt = t.to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
    positive = beta * v_theta + (1 - beta) * v_old
    negative = (1 + beta) * v_old - beta * v_theta
    loss_pos, loss_neg = _x0_loss(x_t - tt * positive, x0), _x0_loss(x_t - tt * negative, x0)
    r = optimality.to(loss_pos.dtype)
    loss = adv_clip_max * (r * loss_pos + (1 - r) * loss_neg) / beta
    if kl_beta:
        loss = loss + kl_beta * (v_theta - v_ref.detach()).pow(2).mean(dim=tuple(range(1, x_t.ndim)))
    return loss
