"""The small contracts every modality and loss agrees on (shared/DESIGN.md, "Contracts").

A `Likelihood` turns a batch into per-item implicit log-likelihoods (`LogpOutput`).
A paired batch holds the chosen items first, then the rejected ones (2B items);
`LogpOutput.pairs()` splits it into a `PairLogps` that the losses consume.

Optional abilities of a likelihood are separate runtime-checkable protocols (`Validates`,
`ScoresModifiedImages`, `TokenValues`, `MeasuresLength`), checked with `isinstance`. Online data comes from a
`DataSource` that returns a `Round` (records + sampler) for each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mmalign.layout import chosen_rejected


@dataclass
class Draw:
    """The randomness of one batch (noise, timesteps, sigmas), made once.

    The trainer hands the SAME draw to the policy and to the reference, so both
    score the chosen and rejected outputs under identical noise. Text and VLM
    likelihoods need none and return an empty draw.
    """

    values: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Draw":
        return Draw({k: v.to(device) for k, v in self.values.items()})


@dataclass
class PairLogps:
    """Log-likelihoods of a paired batch, split into chosen and rejected.

    chosen, rejected: (B,) summed implicit log-likelihoods.
    chosen_tokens, rejected_tokens: (B,) token counts, or None where the
    modality has no tokens (diffusion); `mean()` then leaves the values as they are.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None

    def mean(self) -> "PairLogps":
        """Length-normalised log-likelihoods (mean token log-prob), as SimPO and TRL's IPO use."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            return self
        return PairLogps(
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
            self.chosen_tokens,
            self.rejected_tokens,
        )


@dataclass
class LogpOutput:
    """What a `Likelihood` returns for N items.

    logps: (N,) implicit log-likelihood per item (sum of answer-token log-probs for
        text; -0.5 * mean squared error for diffusion/flow).
    tokens: (N,) number of scored tokens, or None.
    token_logps, token_mask: (N, T) per-token values and their mask, or None.
    diagnostics: extra (N,) tensors for logging (e.g. "mse").
    token_log_sq_mass: (N, T) log sum_v p_t(v)^2 at each scored position, detached (WPO's
        weights, `loss.use_weighting`), or None: filled by a `TokenSquareMass` likelihood
        whose `square_mass` is on.
    transition: (μ (N, ...), s (N,)) of a step likelihood (GRPO): the Gaussian mean of x_{t-1}
        and the scale its KL to the reference divides by, or None.
    """

    logps: Tensor
    tokens: Tensor | None = None
    token_logps: Tensor | None = None
    token_mask: Tensor | None = None
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    token_log_sq_mass: Tensor | None = None
    transition: tuple[Tensor, Tensor] | None = None

    def pairs(self) -> PairLogps:
        """Split a paired output (chosen items first, then rejected) into a `PairLogps`."""
        chosen, rejected = chosen_rejected(self.logps)
        tokens = (None, None) if self.tokens is None else chosen_rejected(self.tokens)
        return PairLogps(chosen, rejected, *tokens)

    def detach(self) -> "LogpOutput":
        def d(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return LogpOutput(
            self.logps.detach(),
            d(self.tokens),
            d(self.token_logps),
            d(self.token_mask),
            {k: v.detach() for k, v in self.diagnostics.items()},
            d(self.token_log_sq_mass),
            None if self.transition is None else (self.transition[0].detach(), self.transition[1].detach()),
        )


@dataclass
class PreferenceBatch:
    """A collated batch.

    kind: "pair" (inputs hold 2B items, chosen then rejected), "unpaired"
        (N items with `desirable` labels, for KTO) or "ranked" (B*K items, list-major,
        with `scores` (B, K)) or "rewarded" (B items, each a sample with its `optimality`).
    inputs: model inputs for all items, each tensor with N leading rows.
    index: (B,) dataset row of each example (pairs, lists or unpaired items).
    weights: (B,) per-example loss weights, or None.
    soft_labels: (B,) preference probability p for the `soft` loss, or None.
    desirable: (N,) bool labels for unpaired batches.
    scores: (B, K) scores of ranked lists.
    ref_logps: (N,) precomputed reference log-likelihoods, or None.
    advantages, old_logps: (N,) of a "step" batch (GRPO): each transition's advantage and its
        log-prob when it was sampled, or None.
    optimality: (B,) DiffusionNFT's r in [0, 1] of rewarded samples, or None.
    """

    kind: str
    inputs: dict[str, Any]
    index: Tensor
    weights: Tensor | None = None
    soft_labels: Tensor | None = None
    desirable: Tensor | None = None
    scores: Tensor | None = None
    ref_logps: Tensor | None = None
    advantages: Tensor | None = None
    old_logps: Tensor | None = None
    optimality: Tensor | None = None

    @property
    def num_examples(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        def mv(x: Any) -> Any:
            return x.to(device) if isinstance(x, Tensor) else x

        return PreferenceBatch(
            self.kind,
            {k: mv(v) for k, v in self.inputs.items()},
            mv(self.index),
            mv(self.weights),
            mv(self.soft_labels),
            mv(self.desirable),
            mv(self.scores),
            mv(self.ref_logps),
            mv(self.advantages),
            mv(self.old_logps),
            mv(self.optimality),
        )


@runtime_checkable
class Likelihood(Protocol):
    """One class per model family (text LM, LLaVA, SDXL UNet, flow transformer, ...): what the
    trainer needs from every likelihood. Optional abilities are the separate protocols below.

    deterministic: True when `draw` makes no randomness, so a precomputed reference is exact.
    """

    deterministic: bool

    def to(self, device: torch.device | str) -> "Likelihood":
        """Move the frozen parts it owns (e.g. a VAE and text encoders; none for a text LM) to
        `device`; the trainer calls it once. Returns self."""
        ...

    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        """Turn raw records (dicts from a preference loader) into a batch."""
        ...

    def draw(self, batch: PreferenceBatch, generator: torch.Generator | None) -> Draw:
        """Make the batch's randomness once; shared by policy and reference."""
        ...

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw) -> LogpOutput:
        """Score every item of the batch under `model`."""
        ...


@runtime_checkable
class Validates(Protocol):
    """Ability: samples for a human to watch every `train.validate_every` steps (e.g. images for
    fixed prompts and seeds), called on the main process under `torch.no_grad`."""

    def validate(self, model: torch.nn.Module, step: int, folder: str | Path) -> dict[str, float]:
        """Write the samples of `model` at `step` under `folder`; returns {metric: value} to log."""
        ...


@runtime_checkable
class ScoresModifiedImages(Protocol):
    """Ability (VLMs): answers are scored given the record's images, and `collate` takes a record's
    `images` as PIL images as well as stored values; what `loss.image_term` (mDPO, Re-Align) needs
    to score the chosen answer again with a modified image."""

    def read_image(self, value: Any, where: str, root: str | None = None) -> Any:
        """One stored image value (path, bytes, ...) as the RGB PIL image `collate` would read;
        relative paths resolve against `root` (a record's `_root`), else the likelihood's data
        folders. `where` names the value in errors."""
        ...


@runtime_checkable
class TokenValues(Protocol):
    """Ability: `logps` also fills `token_logps` and `token_mask` (N, T), what `loss.dense_gamma`
    (dense DPO) re-weights."""

    def scored_token_ids(self, batch: PreferenceBatch, width: int) -> Tensor:
        """(N, width) ids of the tokens that the last `width` columns of `token_logps` score."""
        ...


@runtime_checkable
class TokenSquareMass(Protocol):
    """Ability: with `square_mass` set, `logps` also fills `token_log_sq_mass` (N, T), the log of
    sum_v p_t(v)^2 under the model at each scored position (WPO's weights, `loss.use_weighting`)."""

    square_mass: bool


@runtime_checkable
class MeasuresLength(Protocol):
    """Ability: a record's padded width in a batch, measured cheaply (text tokenised, image headers
    read, no forward): what `data.group_by_length` (`mmalign.data.length_grouping`) sorts by."""

    def record_length(self, record: dict[str, Any], kind: str) -> int:
        """Tokens of the record's longest item as `collate` lays it out: prompt (image tokens
        included where known) + the longest answer, capped at the likelihood's max_length."""
        ...


@runtime_checkable
class MicroBatchSampler(Protocol):
    """Which record rows a process reads at each micro-step (`mmalign.data.preference.StreamSampler`)."""

    def micro_batch(self, micro_step: int, batch_size: int, rank: int, world_size: int) -> list[int]:
        """`batch_size` row indices for process `rank` of `world_size` at global micro-step `micro_step`."""
        ...


@dataclass
class Round:
    """What the trainer trains on from some step on: `records` (read by index only, never
    mutated) and the `sampler` that picks each micro-batch's rows from them. Online rounds
    (`online:`) also give `first_step` (the optimizer step the round begins at) and `metrics`
    (the round's guard values, logged by the trainer at that step; `mmalign.online.guards`)."""

    records: Sequence[dict[str, Any]]
    sampler: MicroBatchSampler
    first_step: int = -1
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class DataSource(Protocol):
    """Online data (SPO / D3PO rounds, ...): the trainer asks it, before every optimizer step, for
    the records to train on; a source never writes trainer attributes. Rounds must be functions
    of (seed, round) and of the weights at their first step, so resume and multi-process runs
    stay exact. Offline runs (a preference file) have no source.

    kind: the batch kind of its records ("pair", "unpaired", "ranked", "rewarded").
    """

    kind: str

    def describe(self) -> str:
        """What the trainer's start-up line says instead of "N examples from FILE"."""
        ...

    def records_for_step(self, step: int, model: torch.nn.Module, accelerator: Any) -> Round:
        """The `Round` that optimizer step `step` trains on (the same object while a round lasts).
        model: the current policy, unwrapped; accelerator: the run's `accelerate.Accelerator`
        (device, autocast, process rank)."""
        ...


@runtime_checkable
class PredictsVelocity(Protocol):
    """Ability (diffusion and flow likelihoods): the model's prediction in the flow convention
    x_t = (1-t)·x0 + t·ε, v = ε - x0, at the times of a sampling schedule: what DiffusionNFT
    (`loss.name: nft`, mmalign/train/nft.py) trains on."""

    def flow_schedule(self, num_steps: int) -> Tensor:
        """(S,) the noise levels (σ, or UNet timesteps) of an S-step sampling schedule."""
        ...

    def at_times(self, draw: Draw, times: Tensor, noise: Tensor) -> Draw:
        """The draw with per-item noise levels `times` (N,) (schedule entries) and noise (N, ...)."""
        ...

    def flow_prediction(self, model: torch.nn.Module, draw: Draw) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t (N,), v̂, x0) of the draw in the flow convention, float32."""
        ...
