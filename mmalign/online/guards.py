"""Guards against reward hacking in online rounds (issue 15, item 4), logged per round in
metrics.jsonl at the round's first step:

- online/reward_mean, online/reward_std: mean and population std (ddof 0) of the combined
  training `score` over the round's scored samples;
- online/tie_fraction: groups (a prompt's samples, >= 2 scored) whose scores are all equal
  (max - min <= TIE_TOL) over all such groups: groups no strategy can make a record of;
- online/kept_records: the round's online records (offline ones mixed in not counted);
- online/eval_reward_mean: mean `online.eval_scorer` score of the held-out prompts, sampled by
  the policy at the round's start with seeds FIXED across rounds (a rise of the training reward
  without one of this is the sign of a hacked scorer);
- online/kl: `round_kl`, the KL estimate of the policy to the reference on the round's samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mmalign.errors import ConfigError
from mmalign.families import Family
from mmalign.nn import eval_mode
from mmalign.seeds import ROW, RUN, mix_seed

EVAL_SEED_OFFSET = 43  # held-out samples' seeds: a function of (train.seed, prompt, sample) only
KL_SEED_OFFSET = 47  # the draws (diffusion noise, timesteps) of the KL estimate


def round_metrics(rows: list[dict[str, Any]], kept: int) -> dict[str, float]:
    """reward_mean, reward_std, tie_fraction, kept_records of a scored round (module docstring)."""
    from mmalign.builders.scores import TIE_TOL, group_by_prompt

    scored = [r for r in rows if r.get("score") is not None]
    values = [float(r["score"]) for r in scored]
    mean = sum(values) / len(values) if values else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else 0.0
    groups = [g for g in group_by_prompt(scored).values() if len(g) >= 2]
    ties = sum(1 for g in groups if max(float(r["score"]) for r in g) - min(float(r["score"]) for r in g) <= TIE_TOL)
    return {"online/reward_mean": mean, "online/reward_std": std,
            "online/tie_fraction": ties / len(groups) if groups else 0.0, "online/kept_records": float(kept)}


def load_eval_prompts(settings: Any, family: Family) -> tuple[list[str], list[dict[str, Any]]]:
    """(prompts, per-prompt fields) of `online.eval_prompt_list`, else of the file `online.eval_prompts`
    (([], []) without either), read as the training prompts are for `family` (`online_prompts`): a
    VLM's held-out prompts are records with their image(s) (and objects), so they are sampled
    about their images and the eval scorer sees them."""
    from mmalign.online.samplers import online_prompts

    if not settings.eval_prompt_list and not settings.eval_prompts:
        return [], []
    if not settings.eval_prompt_list and not Path(settings.eval_prompts).is_file():
        raise ConfigError(f"online.eval_prompts: prompt file not found: '{settings.eval_prompts}'")
    held_out = SimpleNamespace(prompt_list=settings.eval_prompt_list, prompts=settings.eval_prompts)
    return online_prompts(family, held_out, ("online.eval_prompts", "online.eval_prompt_list"))


def eval_rows(prompts: list[str], samples: int, seed: int,
              fields: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The held-out rows (manifest shape), prompt-major, id eval-p<slot>-s<j>; seed of (slot, j)
    = mix_seed(train.seed, slot, j): the same in every round, so rounds compare the policy alone.
    fields[slot]: the prompt's own fields (a VLM prompt's images and objects) copied into its rows."""
    fields = fields or [{} for _ in prompts]
    return [{"id": f"eval-p{slot:03d}-s{j:02d}", "prompt_index": slot, "prompt": prompt, "sample": j,
             "seed": mix_seed(seed, slot, j, strides=(RUN, ROW, 1), offset=EVAL_SEED_OFFSET), **fields[slot]}
            for slot, prompt in enumerate(prompts) for j in range(samples)]


def mean_score(rows: list[dict[str, Any]]) -> float:
    """Mean combined `score` of the rows that have one (nan when none has)."""
    values = [float(r["score"]) for r in rows if r.get("score") is not None]
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def round_kl(likelihood: Any, policy: torch.nn.Module, reference: Any, records: list[dict[str, Any]], kind: str,
             device: Any, batch_size: int, seed: int, autocast: Any) -> float:
    """KL(pi || pi_ref) estimated on the round's sampled outputs:

        KL ~= (1 / M) sum_m [log pi(y_m | x_m) - log pi_ref(y_m | x_m)],   y_m ~ pi,

    over the M outputs of the records (chosen and rejected of each pair, the K outputs of each
    ranked list), with log pi as the run's likelihood computes it (`likelihood.logps`: summed
    answer-token log-probs for text; for diffusion/flow the ELBO surrogate -0.5 * weighted
    denoising MSE on ONE seeded draw of t and noise, so the value is the surrogate log-ratio
    of Diffusion-DPO, not an exact KL, and it can be slightly negative). The policy is scored in eval mode; each batch's draw is
    shared by policy and reference (`reference.logps(batch, draw)`)."""
    total, count = 0.0, 0
    with eval_mode(policy):
        for start in range(0, len(records), batch_size):
            part = [dict(r, _index=start + i) for i, r in enumerate(records[start:start + batch_size])]
            batch = likelihood.collate(part, kind).to(device)
            generator = torch.Generator().manual_seed(mix_seed(seed, start, offset=KL_SEED_OFFSET))
            draw = likelihood.draw(batch, generator).to(device)
            with autocast():
                policy_logps = likelihood.logps(policy, batch, draw).logps.float()
            ratio = policy_logps - reference.logps(batch, draw).logps.float()
            total, count = total + float(ratio.double().sum()), count + ratio.numel()
    return total / count if count else 0.0


def check_refresh(cfg: Any, strategy: str) -> None:
    """`online.reference_update: every_round` needs a frozen reference copy to load the policy into."""
    if cfg.online is not None and cfg.online.reference_update == "every_round" and strategy != "frozen":
        raise ConfigError(f"online.reference_update every_round needs reference.strategy frozen; this run's reference "
                          f"is '{strategy}'")
