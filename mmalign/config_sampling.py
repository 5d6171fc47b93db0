"""The config sections of runs that sample during training: SPO / D3PO step rounds (`spo:`), GRPO
rounds (`grpo:`), online rounds (`online:`) and DiffusionNFT's old policy (`nft:`). Typed like every
section of `mmalign.config` (which re-exports them) and checked there at load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepConfig:
    """Online step-aware sampling for SPO / D3PO (modalities `sd_spo`, `sdxl_spo`; METHODS.md §2).

    Every `round_steps` optimizer steps the current policy samples `prompts_per_round` prompts
    and the round's transition pairs replace the training records (mmalign/modalities/step_sampler.py)."""

    method: str = "spo"  # spo: k candidates from the same x_t per step; d3po: 2 trajectories, one label each
    prompts: str = ""  # prompt file: .txt (one per line) or .jsonl/.json records with "prompt"
    prompt_list: list[str] = field(default_factory=list)  # or the prompts themselves (tiny runs)
    prompts_per_round: int = 16
    round_steps: int = 10  # optimizer steps trained on one round's pairs before the next round is sampled
    sample_batch_size: int = 8  # prompts sampled together
    sampler: str = "ddim"  # ddim (eta > 0) or ddpm; schedule from the pipeline's scheduler config
    num_steps: int = 20
    eta: float = 1.0  # ddim only
    guidance: float = 5.0  # classifier-free guidance, also inside the training likelihood
    candidates: int = 4  # spo: k candidates x_{t-1} drawn from the same x_t
    first_step: int = 0  # sampler steps before this index are not turned into pairs
    threshold: float = 0.3  # keep (best, worst) when softmax(score_scale * scores) gap > threshold
    score_scale: float = 1.0  # multiplies scores before the softmax (1 for logit-like scorers)
    scorer: str = "redness"  # built-in name (redness) or module:function, function(cfg) -> scorer
    labels: str = ""  # d3po: human labels jsonl {"id": trajectory pair id, "preferred": 0 | 1}
    save_rounds: bool = True  # keep each round in output_dir/rounds (resume reads it back)
    # mixing: N records of data.train (seeded per round, without replacement) appended to each
    # round's online records (same record kind); 0 with data.train set is refused
    offline_per_round: int = 0
    # reward-hacking guards: held-out prompts sampled by the policy at each round start with FIXED
    # seeds (eval_samples per prompt), scored by eval_scorer (`mmalign score` specs, apart from
    # the training scorer); logged as online/eval_reward_mean
    eval_scorer: list[str] = field(default_factory=list)
    eval_prompts: str = ""  # prompt file (as `prompts`)
    eval_prompt_list: list[str] = field(default_factory=list)  # or the prompts themselves
    eval_samples: int = 2
    reference_update: str = "none"  # none | every_round: copy the policy into the reference at each round start
    save_images: bool = False  # d3po: write each trajectory's final image to label by hand


@dataclass
class GRPOConfig:
    """Online GRPO rounds for the `*_grpo` families (sd3_grpo, flux_grpo, sd_grpo; METHODS.md C.1, C.2;
    mmalign/modalities/grpo_source.py): every `round_steps` optimizer steps the current policy samples
    `group_size` SDE trajectories per prompt; each trained step is one record with its advantage."""

    prompts: str = ""  # prompt file: .txt (one per line) or .jsonl/.json records with "prompt"
    prompt_list: list[str] = field(default_factory=list)  # or the prompts themselves (tiny runs)
    prompts_per_round: int = 8
    group_size: int = 4  # trajectories per prompt (Flow-GRPO 24, DanceGRPO 12)
    round_steps: int = 2  # optimizer steps on one round's transitions (Flow-GRPO: 2 per epoch)
    sample_batch_size: int = 8  # trajectories sampled together
    num_steps: int = 10  # sampling steps S
    # flow: sde (Flow-GRPO, std_t = a·sqrt(σ/(1-σ))), cps (coefficients-preserving), dance (DanceGRPO,
    # constant η = a); UNet families sample DDIM with η = noise_level (sde only)
    sde_type: str = "sde"
    noise_level: float = 0.7  # a (Flow-GRPO 0.7, CPS 0.8), DanceGRPO's η (0.3), DDIM's η (UNet)
    guidance: float = 4.5  # classifier-free guidance in sampling AND in the training likelihood (1 = off)
    timestep_fraction: float = 0.99  # window_size 0: train int(num_steps·fraction) steps of each trajectory
    timestep_selection: str = "first"  # first (Flow-GRPO: all but the last) or random (DanceGRPO), per prompt group
    window_size: int = 0  # Flow-GRPO-Fast: k SDE (and trained) steps in a random window, ODE elsewhere; 0 = off
    window_range: list[int] = field(default_factory=list)  # [lo, hi): where windows start/end ([] = [0, num_steps])
    # `mmalign score` specs NAME=PATH[,key=value...], a built-in (redness) or module:function
    scorer: list[str] = field(default_factory=list)
    scorer_weights: list[float] = field(default_factory=list)  # one per scorer ([] = all 1)
    # advantage std over the whole round (flow_grpo's shipped configs) vs per group; also DiffusionNFT's
    # (online.strategy: rewards), whose advantages are this formula with eps 1e-4, ddof 0
    global_std: bool = True
    per_reward_norm: bool = False  # GDPO-style: normalise each scorer's reward per group before weighting
    advantage_eps: float = 1e-4  # A = (R - mean) / (std + advantage_eps)
    std_ddof: int = 0  # 0: population std (flow_grpo); 1: unbiased (DanceGRPO's torch .std(), eps 1e-8)
    save_rounds: bool = True  # keep each round in output_dir/rounds (resume reads it back)


@dataclass
class OnlineConfig:
    """Online rounds for any family whose descriptor samples (`online:`; mmalign/online/).

    Every `round_steps` optimizer steps the CURRENT policy samples `group_size` outputs for each
    of the next `prompts_per_round` prompts of a seeded prompt stream, the `scorer` specs score
    them and `strategy` turns each prompt's group into training records (builders/scores.py)."""

    prompts: str = ""  # prompt file: .txt (one per line) or .jsonl/.json records with "prompt"
    prompt_list: list[str] = field(default_factory=list)  # or the prompts themselves (tiny runs)
    prompts_per_round: int = 8
    group_size: int = 4  # samples per prompt (>= 2)
    round_steps: int = 10  # optimizer steps trained on one round's records before the next round
    # `mmalign score` specs NAME=PATH[,key=value...][:weight]; combined as sum_k w_k s_k
    scorer: list[str] = field(default_factory=list)
    znorm: bool = False  # z-normalise each scorer over the round before weighting
    scorer_device: str = "auto"  # auto (the run's device), cpu, cuda
    strategy: str = "best_worst"  # best_worst | margin | ranked | soft (best_worst + soft_label) | rewards (nft)
    margin: float = 0.0  # a kept pair's (ranked: list's) score gap must be >= margin
    list_size: int = 0  # ranked: K outputs per list (0: group_size)
    soft_temperature: float = 1.0  # soft: soft_label = sigmoid((s_chosen - s_rejected) / soft_temperature)
    # the family's sampler settings: text (max_new_tokens, temperature, top_p, do_sample, chat_template)
    # or pipeline __call__ arguments (num_inference_steps, guidance_scale, height, width, ...)
    sampling: dict[str, Any] = field(default_factory=dict)
    sample_batch_size: int = 8  # samples generated together
    save_rounds: bool = True  # keep each round in output_dir/rounds (resume reads it back)
    # mixing: N records of data.train (seeded per round, without replacement) appended to each
    # round's online records (same record kind); 0 with data.train set is refused
    offline_per_round: int = 0
    # reward-hacking guards: held-out prompts sampled by the policy at each round start with FIXED
    # seeds (eval_samples per prompt), scored by eval_scorer (`mmalign score` specs, apart from
    # the training scorer); logged as online/eval_reward_mean
    eval_scorer: list[str] = field(default_factory=list)
    eval_prompts: str = ""  # prompt file (as `prompts`)
    eval_prompt_list: list[str] = field(default_factory=list)  # or the prompts themselves
    eval_samples: int = 2
    reference_update: str = "none"  # none | every_round: copy the policy into the reference at each round start
    # rewards (DiffusionNFT): A = (R - group mean) / (std + 1e-4) clipped to ±loss.adv_clip_max, std of
    # the whole round (grpo.global_std, the one advantage-normalisation knob) or of the prompt's group


@dataclass
class NFTConfig:
    """DiffusionNFT's training times and "old" policy (`loss.name: nft`; mmalign/train/nft.py,
    old_policy.py; METHODS.md C.3)."""

    decay_type: int = 1  # θ_old ← η θ_old + (1-η) θ per round: 0 η=0; 1 min(0.001 k, 0.5); 2 min(0.0075 (k-75)+, 0.999)
    num_steps: int = 0  # the schedule NFT trains at (0: online.sampling.num_inference_steps, else 10)
    timestep_fraction: float = 0.99  # each sample trains at int(num_steps · fraction) times of its permuted schedule
