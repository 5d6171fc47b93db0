"""GRPO's online data (METHODS.md C.1, C.2): every `grpo.round_steps` optimizer steps the CURRENT
policy samples `group_size` SDE trajectories for each of the round's `prompts_per_round` prompts,
records every trained step's transition with its log-prob at sampling, scores the final images,
and turns the rewards into group-normalised advantages (`mmalign.losses_grpo.group_advantages`).

Trained steps of a trajectory (S = grpo.num_steps):
- `window_size` k = 0: every step is SDE (noise level a), int(S·timestep_fraction) steps with a
  density are trained: the first ones (Flow-GRPO: 9 of 10; the last, near-clean step is left out)
  or, `timestep_selection: random`, a seeded random subset per prompt group (DanceGRPO draws one
  per sample);
- k > 0 (Flow-GRPO-Fast): per prompt group a start ~ randint(lo, hi - k) (inclusive, `window_range`
  [lo, hi)), steps [start, start + k) are SDE and trained, every other step is the ODE (a = 0).

Randomness: row (slot p, sample j) of round r draws its initial noise and its step noises from
its own generator seeded `online.rounds.sample_seed(train.seed, r, p, j)`; the window of slot p
from mix_seed(train.seed, r, p); so a round is a function of (seed, r, the weights at its start),
the same on every process. With `grpo.save_rounds` a round is kept in
output_dir/rounds/grpo_NNNNN.safetensors and a resumed run reads it back.

Records (kind "step", one per trained transition): {"prompt", "x_t", "completion" (x_{t-1}), "t",
"t_next", "noise_level", "old_logp", "advantage", "reward", "step", "row"}; rows whose advantage is
exactly 0 are dropped (no gradient), as flow_grpo does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmalign.data.preference import StreamSampler, batch_fields, flatten
from mmalign.errors import ConfigError, DataError
from mmalign.io import atomic_path
from mmalign.losses_grpo import group_advantages
from mmalign.modalities.step import StepLikelihood, alphas_at, ddim_transition, gaussian_logp, predict_x0_eps
from mmalign.modalities.step_sampler import RoundSampler, load_prompts, load_step_scorer, run_fingerprint
from mmalign.modalities.validation import decode_latents
from mmalign.nn import eval_mode
from mmalign.online.rounds import sample_seed
from mmalign.seeds import ROW, RUN, mix_seed
from mmalign.types import Draw, LogpOutput, PreferenceBatch, Round

ROUND_SEED_OFFSET = 31  # the round's micro-batch stream
WINDOW_SEED_OFFSET = 37


class TrajectoryLikelihood(Protocol):
    """What the sampler and `step_logps` need (FlowStepLikelihood, UNetStepLikelihood)."""

    vae: Any

    def steps(self) -> list[tuple[float, float]]: ...
    def latent_shape(self) -> tuple[int, ...]: ...
    def init_sigma(self) -> float: ...
    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]: ...
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]: ...
    def guided(self, model: torch.nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor: ...
    def transition(self, output: Tensor, x: Tensor, t: Tensor, t_next: Tensor,
                   noise_level: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...
    def step_logp(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor: ...


# -- the UNet (DDIM η > 0) step likelihood -----------------------------------------------------
class UNetStepLikelihood:
    """GRPO on an SD / SDXL UNet: the DDIM (η = noise level) transition of `StepLikelihood`
    (mmalign/modalities/step.py); kl_scale = the transition std σ_t."""

    deterministic: bool = False

    def __init__(self, step: StepLikelihood) -> None:
        self.step, self.settings = step, step.settings

    @property
    def vae(self) -> Any:
        return self.step.vae

    def to(self, device: torch.device | str) -> "UNetStepLikelihood":
        self.step.to(device)
        return self

    def validate(self, model: torch.nn.Module, step: int, folder: Any) -> dict[str, float]:
        return self.step.validate(model, step, folder)

    def steps(self) -> list[tuple[float, float]]:
        ts, prevs = self.step.timesteps()
        return [(float(t), float(p)) for t, p in zip(ts.tolist(), prevs.tolist())]

    def latent_shape(self) -> tuple[int, ...]:
        return self.step.latent_shape()

    def init_sigma(self) -> float:
        return float(self.step.scheduler.init_noise_sigma)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        return self.step.tokenize(prompts)

    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.step.encode(ids)

    def guided(self, model: torch.nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.step.guided_output(model, x, t.long(), cond)

    def transition(self, output: Tensor, x: Tensor, t: Tensor, t_next: Tensor,
                   noise_level: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = self.step
        ac = s.scheduler.alphas_cumprod
        alpha_t = alphas_at(ac, t.long().to(x.device), s.final_alpha)
        alpha_prev = alphas_at(ac, t_next.long().to(x.device), s.final_alpha)
        x0, eps = predict_x0_eps(output, x, alpha_t, s.prediction_type, s.clip_range)
        mean, std = ddim_transition(x0, eps, alpha_t, alpha_prev, noise_level.to(x.device, torch.float32))
        return mean, std, std

    def step_logp(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return gaussian_logp(x_next, mean, std)

    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        return collate_steps(self, records, kind)

    def draw(self, batch: PreferenceBatch, generator: torch.Generator | None = None) -> Draw:
        return Draw()

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw | None = None) -> LogpOutput:
        return step_logps(self, model, batch)


# -- collate and score transitions (both likelihoods) ---------------------------------------------
def collate_steps(lik: TrajectoryLikelihood, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
    """Step records -> a "step" batch of N items: x_t, x_prev (N, C, h, w); t, t_next, noise_level
    (N,) float32; the prompts' token ids; advantages, old_logps (N,) as batch fields."""
    if kind != "step":
        raise ValueError(f"GRPO data is sampled transitions (kind 'step'); got a '{kind}' batch")
    items = flatten(records, kind)
    inputs: dict[str, Any] = {
        "x_t": torch.stack([item["x_t"] for item in items]).float(),
        "x_prev": torch.stack([item["response"] for item in items]).float(),
        **{k: torch.tensor([float(item[k]) for item in items]) for k in ("t", "t_next", "noise_level")},
    }
    inputs.update(lik.tokenize([str(item["prompt"]) for item in items]))
    return batch_fields(records, kind, inputs)


def step_logps(lik: TrajectoryLikelihood, model: torch.nn.Module, batch: PreferenceBatch) -> LogpOutput:
    """logps (N,) of x_{t-1} under the step Gaussian of the (guided) model output at x_t;
    transition = (μ (N, ...), kl_scale (N,)); diagnostics {"step_std": s (N,)}."""
    x = batch.inputs
    cond = lik.encode({k: v for k, v in x.items() if k.startswith("input_ids")})
    output = lik.guided(model, x["x_t"], x["t"], cond)
    mean, std, scale = lik.transition(output, x["x_t"], x["t"], x["t_next"], x["noise_level"])
    if bool((std <= 0).any()):
        raise ValueError("a transition with zero noise (an ODE step) has no density; only SDE steps are trained")
    return LogpOutput(logps=lik.step_logp(x["x_prev"], mean, std), diagnostics={"step_std": std.detach()},
                      transition=(mean, scale))


# -- sampling -----------------------------------------------------------------------------------
def trained_steps(num_steps: int, settings: Any, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(SDE steps, trained steps) of one prompt group (module docstring)."""
    k = settings.window_size
    if k == 0:
        count = int(num_steps * settings.timestep_fraction)
        if settings.timestep_selection == "random":
            return list(range(num_steps)), sorted(torch.randperm(num_steps, generator=generator)[:count].tolist())
        return list(range(num_steps)), list(range(count))
    lo, hi = settings.window_range or [0, num_steps]
    start = int(torch.randint(lo, hi - k + 1, (1,), generator=generator))
    window = list(range(start, start + k))
    return window, window


@torch.no_grad()
def sample_trajectories(lik: TrajectoryLikelihood, model: torch.nn.Module, prompts: list[str], seeds: list[int],
                        sde_steps: list[list[int]], train_steps: list[list[int]], noise_level: float,
                        device: torch.device | str = "cpu") -> tuple[list[list[dict[str, Any]]], Tensor]:
    """Sample one trajectory per row (prompt, seed, its SDE and trained step indices).

    Per row: x_0 = init_sigma·ε from Generator(seed), then each step i draws its noise from the
    same generator (every step, ODE or not): x' = μ + s·ε, s = 0 outside the SDE steps.
    Returns per row the trained steps' dicts {"step", "t", "t_next", "noise_level", "x_t",
    "completion", "old_logp"} (CPU tensors) and the final latents (n, C, h, w)."""
    device = torch.device(device)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = tuple(lik.latent_shape())
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) * lik.init_sigma()
    cond = lik.encode(lik.tokenize(prompts))
    n = len(prompts)
    out: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for i, (t, t_next) in enumerate(lik.steps()):
        eps = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        a = torch.tensor([noise_level if i in sde_steps[j] else 0.0 for j in range(n)])
        t_n, tn_n = torch.full((n,), t), torch.full((n,), t_next)
        v = lik.guided(model, x, t_n.to(device), cond)
        mean, std, _ = lik.transition(v, x, t_n.to(device), tn_n.to(device), a.to(device))
        x_next = mean + std.view(-1, *[1] * (x.ndim - 1)) * eps
        trained = [j for j in range(n) if i in train_steps[j] and float(std[j]) > 0]
        if trained:
            logp = lik.step_logp(x_next, mean, std.clamp(min=1e-20)).cpu()
            for j in trained:
                out[j].append({"step": i, "t": t, "t_next": t_next, "noise_level": noise_level, "x_t": x[j].cpu(),
                               "completion": x_next[j].cpu(), "old_logp": float(logp[j])})
        x = x_next
    return out, x


# -- rounds --------------------------------------------------------------------------------------
TENSOR_FIELDS = ("x_t", "completion")
FLOAT_FIELDS = ("t", "t_next", "noise_level", "old_logp", "advantage", "reward")
INT_FIELDS = ("step", "row")


def save_round(records: list[dict[str, Any]], path: Path, fingerprint: str) -> None:
    """A round's records as stacked tensors (safetensors, atomic); prompts in its metadata."""
    from safetensors.torch import save_file

    tensors = {f: torch.stack([r[f] for r in records]).contiguous() for f in TENSOR_FIELDS}
    tensors.update({f: torch.tensor([float(r[f]) for r in records], dtype=torch.float64) for f in FLOAT_FIELDS})
    tensors.update({f: torch.tensor([int(r[f]) for r in records]) for f in INT_FIELDS})
    meta = {"prompts": json.dumps([r["prompt"] for r in records]), "fingerprint": fingerprint,
            "count": str(len(records))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_round(path: Path, fingerprint: str) -> list[dict[str, Any]] | None:
    """The records of a saved round, or None when missing or from another run."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prompts = json.loads(meta["prompts"])
    records = []
    for i in range(int(meta["count"])):
        r: dict[str, Any] = {"prompt": prompts[i], **{f: tensors[f][i] for f in TENSOR_FIELDS}}
        r.update({f: float(tensors[f][i]) for f in FLOAT_FIELDS})
        r.update({f: int(tensors[f][i]) for f in INT_FIELDS})
        records.append(r)
    return records


class GRPOSource:
    """The trainer's data source (mmalign.types.DataSource) of the `*_grpo` families: optimizer step
    s trains on round r = s // grpo.round_steps (module docstring). Every process samples the same
    round; the round's sampler splits its records across processes."""

    kind: str = "step"

    def __init__(self, likelihood: TrajectoryLikelihood, cfg: Any) -> None:
        self.likelihood, self.cfg, self.settings = likelihood, cfg, cfg.grpo
        self.prompts = load_prompts(cfg.grpo, "grpo")
        self.prompt_stream = StreamSampler(len(self.prompts), cfg.train.seed)
        self.scorers = [load_step_scorer(spec, cfg) for spec in cfg.grpo.scorer]
        self.fingerprint = run_fingerprint(cfg)
        self.round, self.current = -1, None

    def describe(self) -> str:
        s = self.settings
        return (f"online GRPO rounds of {s.round_steps} steps ({s.prompts_per_round} prompts x {s.group_size} "
                f"trajectories at noise level {s.noise_level}, scored by {', '.join(s.scorer)})")

    def round_path(self, r: int) -> Path:
        return Path(self.cfg.train.output_dir) / "rounds" / f"grpo_{r:05d}.safetensors"

    def records_for_step(self, step: int, model: torch.nn.Module, accelerator: Any) -> Round:
        s, t = self.settings, self.cfg.train
        r = step // s.round_steps
        if r != self.round or self.current is None:
            records = load_round(self.round_path(r), self.fingerprint) if s.save_rounds else None
            if records is None:
                records = self.sample(r, model, accelerator)
                if s.save_rounds and accelerator.is_main_process:
                    save_round(records, self.round_path(r), self.fingerprint)
            seed = mix_seed(t.seed, r, strides=(ROW, 1), offset=ROUND_SEED_OFFSET, wrap=False)
            self.current = Round(records, RoundSampler(len(records), seed, r * s.round_steps * t.grad_accum))
            self.round = r
        return self.current

    def score(self, prompts: list[str], latents: Tensor) -> Tensor:
        """(K, n) rewards of the final latents (n, C, h, w) by each of the K scorers."""
        images = decode_latents(self.likelihood.vae, latents)
        zeros = torch.zeros(len(prompts), dtype=torch.long)
        return torch.stack([scorer.score(prompts, images, zeros).float().reshape(-1).cpu() for scorer in self.scorers])

    def sample(self, r: int, model: torch.nn.Module, accelerator: Any) -> list[dict[str, Any]]:
        """Round r's step records: sampled by `model` (eval mode, no grad), scored, with advantages."""
        s, seed = self.settings, self.cfg.train.seed
        prompts = [self.prompts[i] for i in self.prompt_stream.indices(r * s.prompts_per_round, s.prompts_per_round)]
        rows = [(slot, j) for slot in range(len(prompts)) for j in range(s.group_size)]
        num_steps = len(self.likelihood.steps())
        plans = [trained_steps(num_steps, s, torch.Generator().manual_seed(
            mix_seed(seed, r, slot, strides=(RUN, ROW, 1), offset=WINDOW_SEED_OFFSET))) for slot in range(len(prompts))]
        steps: list[list[dict[str, Any]]] = []
        rewards = []
        bar = tqdm(range(0, len(rows), s.sample_batch_size), desc=f"grpo round {r}", leave=False,
                   disable=not (self.cfg.train.progress and accelerator.is_main_process))
        with eval_mode(model), accelerator.autocast():
            for start in bar:
                chunk = rows[start : start + s.sample_batch_size]
                texts = [prompts[slot] for slot, _ in chunk]
                got, final = sample_trajectories(
                    self.likelihood, model, texts, [sample_seed(seed, r, slot, j) for slot, j in chunk],
                    [plans[slot][0] for slot, _ in chunk], [plans[slot][1] for slot, _ in chunk],
                    s.noise_level, accelerator.device)
                steps += got
                with torch.no_grad():
                    rewards.append(self.score(texts, final))
        reward = torch.cat(rewards, dim=1).view(len(self.scorers), len(prompts), s.group_size)
        adv = group_advantages(reward, s.scorer_weights or None, s.global_std, s.per_reward_norm,
                               s.advantage_eps, s.std_ddof).flatten()
        combined = (reward * torch.tensor(s.scorer_weights or [1.0] * len(self.scorers)).view(-1, 1, 1)).sum(0)
        records = [{"prompt": prompts[rows[n][0]], **step, "advantage": float(adv[n]),
                    "reward": float(combined.flatten()[n]), "row": n}
                   for n in range(len(rows)) if float(adv[n]) != 0.0 for step in steps[n]]
        if accelerator.is_main_process:
            kept = sum(float(a) != 0.0 for a in adv)
            print(f"[mmalign] grpo round {r}: {len(rows)} trajectories, mean reward {combined.mean():.4f}; "
                  f"{len(records)} transitions from {kept} kept, dropped {len(rows) - kept} (advantage 0)")
        if not records:
            raise DataError(f"grpo round {r}: every advantage is 0 (equal rewards in every group): raise "
                            "grpo.group_size or grpo.noise_level, or use another scorer")
        return records


# -- families `sd3_grpo`, `flux_grpo`, `sd_grpo` (mmalign/families/) -------------------------------------
def check_settings(cfg: Any) -> None:
    """ConfigErrors for `grpo:` values that cannot run (one line naming the key)."""
    s = cfg.grpo
    if cfg.data.train:
        raise ConfigError(f"data.train is not read by '{cfg.modality}': trajectories are sampled online from "
                          "grpo.prompts")
    for name in ("prompts_per_round", "round_steps", "sample_batch_size", "num_steps"):
        if getattr(s, name) < 1:
            raise ConfigError(f"grpo.{name} must be >= 1, got {getattr(s, name)}")
    if s.group_size < 2:
        raise ConfigError(f"grpo.group_size must be >= 2 (advantages are normalised per group), got {s.group_size}")
    if s.noise_level <= 0:
        raise ConfigError(f"grpo.noise_level must be > 0 (0 is the ODE: no log-prob to train), got {s.noise_level}")
    if not s.scorer:
        raise ConfigError("grpo.scorer: name at least one scorer (a built-in, NAME=PATH spec or module:function)")
    for spec in s.scorer:
        if "=" in spec:
            from mmalign.scoring import parse_spec

            if parse_spec(spec).weight != 1.0:
                raise ConfigError(f"grpo.scorer '{spec}': give scorer weights in grpo.scorer_weights, not as ':weight'")
    if s.scorer_weights and len(s.scorer_weights) != len(s.scorer):
        raise ConfigError(f"grpo.scorer_weights needs one weight per grpo.scorer entry, got {len(s.scorer_weights)} "
                          f"for {len(s.scorer)}")
    if not 0 < s.timestep_fraction <= 1 or int(s.num_steps * s.timestep_fraction) < 1:
        raise ConfigError(f"grpo.timestep_fraction must be in (0, 1] and train >= 1 of grpo.num_steps, got "
                          f"{s.timestep_fraction}")
    lo, hi = s.window_range or [0, s.num_steps]
    if s.window_size and not (0 <= lo and hi <= s.num_steps and hi - lo >= s.window_size >= 1):
        raise ConfigError(f"grpo.window_range {[lo, hi]} must lie in [0, grpo.num_steps={s.num_steps}] and hold "
                          f"grpo.window_size={s.window_size} steps")
    if s.advantage_eps < 0:
        raise ConfigError(f"grpo.advantage_eps must be >= 0, got {s.advantage_eps}")
    if s.std_ddof not in (0, 1):
        raise ConfigError(f"grpo.std_ddof must be 0 (population std) or 1 (unbiased), got {s.std_ddof}")


def build_flow(cfg: Any, family_build: Any, trained: bool = True, unpack: Any = None) -> tuple[Any, Any, None]:
    """(transformer, FlowStepLikelihood over the flow family's likelihood, None); never from a cache."""
    from mmalign.modalities.flow_sde import FlowStepLikelihood

    check_settings(cfg)
    model, base, _ = family_build(cfg, use_cache=False, trained=trained)
    return model, FlowStepLikelihood(base, cfg.grpo, unpack), None


def build_unet(cfg: Any, family_build: Any, trained: bool = True) -> tuple[Any, Any, None]:
    """(UNet, UNetStepLikelihood (DDIM, η = grpo.noise_level), None)."""
    from types import SimpleNamespace

    check_settings(cfg)
    if cfg.grpo.sde_type != "sde":
        raise ConfigError(f"grpo.sde_type '{cfg.grpo.sde_type}' is for flow families; a UNet samples DDIM with "
                          "eta = grpo.noise_level (leave sde_type: sde)")
    model, base, _ = family_build(cfg, use_cache=False, trained=trained)
    g = cfg.grpo
    ddim = SimpleNamespace(sampler="ddim", eta=g.noise_level, guidance=g.guidance, num_steps=g.num_steps)
    return model, UNetStepLikelihood(StepLikelihood(base, ddim)), None


def build_source(cfg: Any, likelihood: Any) -> GRPOSource:
    return GRPOSource(likelihood, cfg)
