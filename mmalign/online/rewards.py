"""The `rewards` online strategy (DiffusionNFT, METHODS.md C.3 with C.1's advantage): every scored
sample becomes one "rewarded" record, no pairs.

Per round, with R the combined `score` of each sample and its group the samples of one prompt slot:

    A = clip((R - mean_group(R)) / (std + 1e-4), ±loss.adv_clip_max)
    std = population std of ALL the round's rewards (grpo.global_std, the shipped configs) or of the group
    r = clip(A / loss.adv_clip_max / 2 + 0.5, 0, 1)                   (the sample's optimality weight)

Record: {"prompt", "completion" (text or media path), "reward", "advantage", "optimality" (r),
"id", "prompt_index", "seed"}. Samples without a score are dropped (counted in the summary). Unlike
Flow-GRPO, samples with A = 0 are kept (r = 0.5), as the official DiffusionNFT keeps them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.losses_nft import nft_advantages, optimality_weights


@dataclass
class RewardSelection:
    """What `reward_records` kept: counts of samples, unscored samples, prompts, and the mean |A|."""

    counts: Counter = field(default_factory=Counter)
    mean_abs_advantage: float = 0.0

    def summary(self) -> str:
        c = self.counts
        unscored = f", {c['unscored']} samples without a score dropped" if c["unscored"] else ""
        return (f"{c['kept']} rewarded samples of {c['prompts']} prompts (mean |A| "
                f"{self.mean_abs_advantage:.3f}){unscored}")


def reward_records(rows: list[dict[str, Any]], adv_clip_max: float,
                   global_std: bool) -> tuple[list[dict[str, Any]], RewardSelection]:
    """(records, RewardSelection) of scored rows (module docstring); adv_clip_max: `loss.adv_clip_max`
    (A_max, shared with the NFT loss); global_std: `grpo.global_std` (shared with GRPO)."""
    scored = [r for r in rows if r.get("score") is not None]
    prompts = len({r["prompt_index"] for r in rows})
    selection = RewardSelection(Counter(unscored=len(rows) - len(scored), prompts=prompts, kept=len(scored),
                                        samples=len(rows)))
    if not scored:
        return [], selection
    rewards = torch.tensor([float(r["score"]) for r in scored], dtype=torch.float64)
    groups = torch.tensor([int(r["prompt_index"]) for r in scored])
    advantages = nft_advantages(rewards, groups, global_std, adv_clip_max)
    weights = optimality_weights(advantages, adv_clip_max)
    selection.mean_abs_advantage = float(advantages.abs().mean())
    records = [{"prompt": row["prompt"], "completion": row["text"] if row["kind"] == "text" else row["path"],
                "reward": float(row["score"]), "advantage": float(a), "optimality": float(w), "id": row["id"],
                "prompt_index": row["prompt_index"], "seed": row["seed"]}
               for row, a, w in zip(scored, advantages.tolist(), weights.tolist(), strict=True)]
    return records, selection
