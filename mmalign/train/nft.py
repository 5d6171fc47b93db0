"""DiffusionNFT training (`loss.name: nft`, METHODS.md C.3; `NVlabs/DiffusionNFT` @24af555
`scripts/train_nft_sd3.py` l.800-1040): what the trainer calls instead of scoring log-likelihoods.

Data: online `rewards` rounds (one "rewarded" record per sample: its optimality r), sampled by
the OLD policy (`sampling`). Per record visit at optimizer step s, the record's generator
(seeded by (s, its row)) draws a permutation of the S-step sampling schedule (`nft.num_steps`)
and K = int(S·nft.timestep_fraction) fresh noises; the record trains at the K times perm[:K]:

    x0 = the VAE latent of the sampled image (the likelihood's draw), ε fresh, t = schedule[perm[j]]
    x_t = (1-t)·x0 + t·ε;  v_θ (grad), v_old (θ_old swapped in, no grad), v_ref (LoRA off / frozen
    copy, only when loss.kl_beta > 0), all through the likelihood's `flow_prediction` (UNet
    predictions converted to the flow convention by `ElboObjective.flow_view`)
    loss = mean_j nft_loss(x_t, t, x0, v_θ, v_old, r; β = loss.beta, A_max = loss.adv_clip_max,
           β_KL = loss.kl_beta)

The mean over the K times gives the official gradient (it accumulates K backward passes per
optimizer step, each divided by K); here the K forward passes of a micro-batch are held together,
so memory grows with K (lower train.batch_size and raise train.grad_accum for large models).
Differences from the official code: x0 is re-encoded from the saved PNG (the official keeps the
sampled latent); the old policy is swapped into the trained weights rather than kept as a second
LoRA adapter (same values).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError
from mmalign.losses_nft import nft_loss
from mmalign.seeds import mix_seed
from mmalign.train.old_policy import OldPolicy
from mmalign.types import PredictsVelocity, PreferenceBatch

NFT_SEED_OFFSET = 41  # the per-(step, row) times and noises, apart from the likelihood's own draw


def validate_nft(cfg: Any) -> None:
    """One-line ConfigErrors: nft needs online `rewards` rounds (and they need nft), sane β_KL and times."""
    from mmalign.losses_combined import loss_names

    names = loss_names(cfg.loss.name)
    rewards = cfg.online is not None and cfg.online.strategy == "rewards"
    if "nft" in names and (len(names) > 1 or not rewards):
        raise ConfigError("loss.name nft trains on online rewards rounds alone: set online.strategy: rewards "
                          "(an online: section) and no other loss")
    if rewards and "nft" not in names:
        raise ConfigError(f"online.strategy rewards gives rewarded samples, which only loss nft trains on "
                          f"(loss.name is {cfg.loss.name!r})")
    if not rewards:
        return
    if cfg.loss.kl_beta < 0 or cfg.loss.adv_clip_max <= 0:
        raise ConfigError("loss.kl_beta must be >= 0 and loss.adv_clip_max > 0")
    if cfg.nft.decay_type not in (0, 1, 2):
        raise ConfigError(f"nft.decay_type must be 0, 1 or 2, got {cfg.nft.decay_type}")
    if not 0 < cfg.nft.timestep_fraction <= 1 or schedule_steps(cfg) < 1 or train_times(cfg) < 1:
        raise ConfigError(f"nft.timestep_fraction ({cfg.nft.timestep_fraction}) times nft.num_steps "
                          f"({schedule_steps(cfg)}) must leave at least one training time")


def schedule_steps(cfg: Any) -> int:
    """S: nft.num_steps, else the rounds' sampling num_inference_steps, else 10 (the official)."""
    return cfg.nft.num_steps or int(cfg.online.sampling.get("num_inference_steps", 10))


def train_times(cfg: Any) -> int:
    """K = int(S · nft.timestep_fraction) (official: int(10 · 0.99) = 9)."""
    return int(schedule_steps(cfg) * cfg.nft.timestep_fraction)


def record_times(index: Tensor, seed: int, num_steps: int, k: int,
                 noise_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per row of `index` (B,): the first k entries of a permutation of range(num_steps) (B, k) and k
    standard normals (B, k, *noise_shape), from the generator of (step seed, row)."""
    perms, noises = [], []
    for row in index.tolist():
        g = torch.Generator().manual_seed(mix_seed(seed, row, offset=NFT_SEED_OFFSET))
        perms.append(torch.randperm(num_steps, generator=g)[:k])
        noises.append(torch.randn((k, *noise_shape), generator=g))
    return torch.stack(perms), torch.stack(noises)


class NFTObjective:
    """Losses of rewarded micro-batches and the old policy's hooks (module docstring).

    likelihood: a `PredictsVelocity` (diffusion and flow likelihoods); model: the unwrapped policy
    (its trained parameters define θ_old); reference: the trainer's reference (LoRA off / frozen),
    used when loss.kl_beta > 0."""

    def __init__(self, cfg: Any, likelihood: Any, model: torch.nn.Module, reference: Any, autocast: Any) -> None:
        if not isinstance(likelihood, PredictsVelocity):
            raise ConfigError(f"loss nft needs a diffusion or flow likelihood; modality '{cfg.modality}' has none")
        self.cfg, self.likelihood, self.reference, self.autocast = cfg, likelihood, reference, autocast
        self.old = OldPolicy(model, cfg.nft.decay_type)
        self.schedule = likelihood.flow_schedule(schedule_steps(cfg))
        self.k = train_times(cfg)
        self.sampled_once = False

    @contextmanager
    def sampling(self, model: torch.nn.Module, step: int) -> Iterator[None]:
        """Around the online source's call at optimizer step `step`: when a round ends (step > 0, a
        multiple of online.round_steps), θ_old ← η θ_old + (1-η) θ first; at a round's first step
        (and at the first step of a resumed run) θ_old is swapped in, so the round is sampled by it."""
        boundary = step % self.cfg.online.round_steps == 0
        if boundary and step > 0:
            self.old.update(model, step)
        if boundary or not self.sampled_once:
            self.sampled_once = True
            with self.old.swapped(model):
                yield
        else:
            yield

    def losses(self, model: torch.nn.Module, unwrapped: torch.nn.Module, batch: PreferenceBatch,
               seed: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-record losses (B,) (mean over its K times) and per-record metrics."""
        generator = torch.Generator().manual_seed(seed)
        draw = self.likelihood.draw(batch, generator)
        shape = tuple(draw.values["latents"].shape[1:])
        perms, noises = record_times(batch.index, seed, len(self.schedule), self.k, shape)
        draws = [self.likelihood.at_times(draw, self.schedule[perms[:, j]], noises[:, j]) for j in range(self.k)]
        # θ_old and the reference first: swapping θ_old in after a v_θ forward would break its graph
        with torch.no_grad(), self.autocast(), self.old.swapped(unwrapped):
            old = [self.likelihood.flow_prediction(unwrapped, d)[2] for d in draws]
        refs: list[Tensor | None] = [None] * self.k
        if self.cfg.loss.kl_beta:
            refs = [self.reference.predict(lambda m, d=d: self.likelihood.flow_prediction(m, d))[2] for d in draws]
        c, total, metrics = self.cfg, 0.0, {}
        for step_draw, v_old, v_ref in zip(draws, old, refs, strict=True):
            x_t, t, v_theta, x0 = self.likelihood.flow_prediction(model, step_draw)
            loss = nft_loss(x_t, t, x0, v_theta, v_old, batch.optimality, v_ref, beta=c.loss.beta,
                            adv_clip_max=c.loss.adv_clip_max, kl_beta=c.loss.kl_beta)
            total = total + loss / self.k
            dims = tuple(range(1, x0.ndim))
            part = {"nft/old_deviate": (v_theta - v_old).detach().pow(2).mean(dims), "nft/t": t.detach()}
            if v_ref is not None:
                part["nft/kl"] = (v_theta - v_ref).detach().pow(2).mean(dims)
            for key, value in part.items():
                metrics[key] = metrics.get(key, 0.0) + value / self.k
        metrics.update({"loss": total.detach(), "nft/optimality": batch.optimality.detach()})
        return total, metrics

    def state_dict(self) -> dict[str, Tensor]:
        return self.old.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.old.load_state_dict(state)
