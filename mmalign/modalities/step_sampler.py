"""Online step-aware pair sampling for SPO and D3PO (METHODS.md §2 "Step-aware"), and the
`sd_spo` / `sdxl_spo` modalities that train on it.

SPO (Liang et al. 2024), per batch of prompts: sample a trajectory (DDIM 20 steps, η = 1, CFG);
at each step from `spo.first_step` on, draw k candidates x_{t-1} from the SAME x_t, score each
candidate's predicted x̂0 (decoded by the VAE) with a step-aware scorer at the candidate's
timestep, keep (best, worst) when the softmax gap of their scores exceeds `spo.threshold`, and
continue from a random candidate. The x̂0 of a candidate needs a model call at its own timestep;
that call is also the next step's output for the candidate the trajectory continues from.

D3PO (Yang et al. 2024): two trajectories per prompt; one label per pair of trajectories (the
scorer on the final images, or a human label file); every step of the preferred trajectory is
preferred to the other trajectory's step at the same t.

Rounds: every `spo.round_steps` optimizer steps the CURRENT policy (adapters on, eval mode)
samples the next `spo.prompts_per_round` prompts (a seeded stream over the prompt file). Round r
is a function of (train.seed, r) and the weights at its first step, so a resumed run repeats it;
with `spo.save_rounds` each round is written to output_dir/rounds and read back on resume.

Scorers: any object with `score(prompts, images, timesteps) -> Tensor (N,)`, images (N, 3, H, W)
in [0, 1], timesteps (N,) long. A timestep-agnostic scorer (`score(prompts, images)`, e.g. from
mmalign.scoring) is wrapped by `TimestepAgnostic`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmalign.config import to_dict
from mmalign.data.jsonl import read_text
from mmalign.data.preference import StreamSampler, read_records
from mmalign.errors import ConfigError, DataError
from mmalign.io import atomic_path
from mmalign.modalities.step import StepLikelihood
from mmalign.modalities.validation import decode_latents
from mmalign.nn import eval_mode
from mmalign.seeds import ROW, mix_seed
from mmalign.types import Likelihood, Round


# -- scorers -----------------------------------------------------------------------------------
class StepScorer(Protocol):
    def score(self, prompts: list[str], images: Tensor, timesteps: Tensor) -> Tensor:
        """(N,) preference scores of images (N, 3, H, W) in [0, 1] at their timesteps (N,)."""
        ...


def to_pil(images: Tensor) -> list[Any]:
    """(N, 3, H, W) in [0, 1] -> N RGB PIL images."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu() * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arrays]


class TimestepAgnostic:
    """A step-aware scorer from any image scorer `score(prompts, images) -> (N,)`: the timestep is
    ignored. pil=True hands the images over as PIL images (the `mmalign.scoring` scorers)."""

    def __init__(self, scorer: Any, pil: bool = False) -> None:
        self.scorer, self.pil = scorer, pil

    def score(self, prompts: list[str], images: Tensor, timesteps: Tensor) -> Tensor:
        outputs = to_pil(images) if self.pil else images
        return torch.as_tensor(self.scorer.score(list(prompts), outputs)).float().reshape(-1)


class RednessScorer:
    """A cheap programmatic scorer for tests and the tiny demo: mean of R - (G + B)/2 per image."""

    def score(self, prompts: list[str], images: Tensor) -> Tensor:
        r, g, b = images.float().unbind(dim=1)
        return (r - (g + b) / 2).mean(dim=(1, 2))


BUILTIN_SCORERS = {"redness": RednessScorer}


def load_step_scorer(spec: str, cfg: Any) -> StepScorer:
    """A built-in scorer name; an `mmalign.scoring` spec NAME=PATH[,key=value...] (e.g.
    `pickscore=/models/PickScore_v1,processor=/models/CLIP-ViT-H-14,device=cuda`), timestep-agnostic,
    fed PIL images; or `module:function` where function(cfg) returns a scorer. A scorer whose
    `score` takes no timesteps is wrapped with `TimestepAgnostic`."""
    if spec in BUILTIN_SCORERS:
        scorer = BUILTIN_SCORERS[spec]()
    elif "=" in spec or spec.startswith("python:"):  # python:REF: a user's Scorer (mmalign/scoring/plugin.py)
        from mmalign.scoring import load_scorer

        scorer = load_scorer(spec)
        if not getattr(scorer, "takes_timesteps", False):  # step_aware=FOLDER scores at the candidate's t
            return TimestepAgnostic(scorer, pil=True)
    elif ":" in spec:
        from mmalign.scoring.plugin import import_object

        scorer = import_object(spec, "spo.scorer")(cfg)
    else:
        raise ConfigError(f"spo.scorer '{spec}': use a built-in ({', '.join(BUILTIN_SCORERS)}) or module:function")
    params = [p for p in inspect.signature(scorer.score).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return scorer if len(params) >= 3 else TimestepAgnostic(scorer)


# -- selection --------------------------------------------------------------------------------
def select_pairs(scores: Tensor, threshold: float, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SPO's pair selection over k candidates of each of B groups.

    scores (B, k). p = softmax(scale · scores) over the candidates; best = argmax, worst =
    argmin (first on ties); keep where p[best] - p[worst] > threshold.
    Returns best (B,), worst (B,), keep (B,) bool, gap (B,)."""
    p = torch.softmax(scale * scores.float(), dim=-1)
    best, worst = p.argmax(-1), p.argmin(-1)
    gap = p.gather(1, best[:, None]).squeeze(1) - p.gather(1, worst[:, None]).squeeze(1)
    return best, worst, gap > threshold, gap


# -- sampling -----------------------------------------------------------------------------------
def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator).to(device)


def _conditioning(likelihood: StepLikelihood, prompts: list[str]) -> dict[str, Tensor]:
    return likelihood.encode(likelihood.tokenize(prompts))


def _repeat(cond: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    return {key: v.repeat_interleave(k, dim=0) for key, v in cond.items()}


def _latent_shape(likelihood: StepLikelihood) -> tuple[int, ...]:
    return likelihood.latent_shape()


@torch.no_grad()
def sample_spo_pairs(likelihood: StepLikelihood, model: torch.nn.Module, prompts: list[str],
                     scorer: StepScorer, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """SPO pairs of one batch of prompts (B): records {"prompt", "timestep", "prev_timestep",
    "x_t", "chosen", "rejected", "scores", "step"} (tensors on the CPU) and counts
    {"steps": candidate steps, "kept", "dropped_gap"}."""
    s = likelihood.settings
    k, device = s.candidates, torch.device(device)
    ts, prevs = likelihood.timesteps()
    cond = _conditioning(likelihood, prompts)
    cond_k = _repeat(cond, k)
    b = len(prompts)
    x = _randn((b, *_latent_shape(likelihood)), generator, device) * likelihood.scheduler.init_noise_sigma
    output = None  # the guided output at x when the previous step already computed it
    records, counts = [], {"steps": 0, "kept": 0, "dropped_gap": 0}
    for i, (t, prev) in enumerate(zip(ts.tolist(), prevs.tolist())):
        t_n, prev_n = torch.full((b,), t, device=device), torch.full((b,), prev, device=device)
        if output is None:
            output = likelihood.guided_output(model, x, t_n, cond)
        mean, std, _ = likelihood.transition(output, x, t_n, prev_n)
        if i < s.first_step or float(std[0]) <= 0:
            x, output = mean + std.view(-1, *[1] * (x.ndim - 1)) * _randn(tuple(x.shape), generator, device), None
            continue
        noise = _randn((b, k, *x.shape[1:]), generator, device)
        candidates = (mean[:, None] + std.view(-1, 1, *[1] * (x.ndim - 1)) * noise).flatten(0, 1)  # (B·k, ...)
        prev_k = torch.full((b * k,), prev, device=device)
        cand_output = likelihood.guided_output(model, candidates, prev_k.clamp(min=0), cond_k) if prev >= 0 else None
        x0 = likelihood.predict_x0(cand_output, candidates, prev_k) if prev >= 0 else candidates
        images = decode_latents(likelihood.vae, x0)
        scores = scorer.score([p for p in prompts for _ in range(k)], images, prev_k.clamp(min=0).cpu())
        scores = scores.float().view(b, k).cpu()
        best, worst, keep, _ = select_pairs(scores, s.threshold, s.score_scale)
        counts["steps"] += b
        counts["kept"] += int(keep.sum())
        counts["dropped_gap"] += int((~keep).sum())
        grouped = candidates.view(b, k, *x.shape[1:]).cpu()
        for j in keep.nonzero().flatten().tolist():
            records.append({"prompt": prompts[j], "timestep": t, "prev_timestep": prev, "x_t": x[j].cpu(),
                            "chosen": grouped[j, best[j]], "rejected": grouped[j, worst[j]],
                            "scores": scores[j].tolist(), "step": i})
        pick = torch.randint(0, k, (b,), generator=generator)
        rows = torch.arange(b) * k + pick
        x = candidates[rows.to(device)]
        output = None if cand_output is None else cand_output[rows.to(device)]
    return records, counts


def load_labels(path: str) -> dict[str, int]:
    """D3PO human labels: jsonl rows {"id": trajectory pair id, "preferred": 0 | 1}."""
    labels = {}
    for i, row in enumerate(read_records(path)):
        if "id" not in row or row.get("preferred") not in (0, 1):
            raise DataError(f"{path}: row {i} needs 'id' and 'preferred' (0 or 1), got {row}")
        labels[str(row["id"])] = int(row["preferred"])
    return labels


@torch.no_grad()
def sample_d3po_pairs(likelihood: StepLikelihood, model: torch.nn.Module, prompts: list[str], ids: list[str],
                      scorer: StepScorer | None, labels: dict[str, int] | None, generator: torch.Generator,
                      device: torch.device | str = "cpu",
                      image_dir: Path | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """D3PO pairs of one batch of prompts: two trajectories per prompt (rows j and B + j), labelled
    by `labels[ids[j]]` (0: the first is preferred) or else by the scorer on the final images at t = 0
    (kept when the softmax gap > spo.threshold). Each kept trajectory pair gives one record per step
    with σ_t > 0 from `spo.first_step` on: {"prompt", "timestep", "prev_timestep", "chosen_x_t",
    "chosen", "rejected_x_t", "rejected", "trajectory", "step"}."""
    s, device = likelihood.settings, torch.device(device)
    ts, prevs = likelihood.timesteps()
    b = len(prompts)
    cond = _repeat(_conditioning(likelihood, prompts), 2)  # rows: prompt j twice (2j, 2j + 1)
    x = _randn((2 * b, *_latent_shape(likelihood)), generator, device) * likelihood.scheduler.init_noise_sigma
    steps = []  # (i, t, prev, x_t, x_prev) on the CPU
    for i, (t, prev) in enumerate(zip(ts.tolist(), prevs.tolist())):
        t_n, prev_n = torch.full((2 * b,), t, device=device), torch.full((2 * b,), prev, device=device)
        mean, std, _ = likelihood.transition(likelihood.guided_output(model, x, t_n, cond), x, t_n, prev_n)
        x_prev = mean + std.view(-1, *[1] * (x.ndim - 1)) * _randn(tuple(x.shape), generator, device)
        if i >= s.first_step and float(std[0]) > 0:
            steps.append((i, t, prev, x.cpu(), x_prev.cpu()))
        x = x_prev
    images = decode_latents(likelihood.vae, x)
    counts = {"trajectory_pairs": b, "kept": 0, "dropped_gap": 0, "dropped_unlabelled": 0}
    if labels is not None:
        preferred = torch.tensor([labels.get(i, -1) for i in ids])
        keep = preferred >= 0
        counts["dropped_unlabelled"] = int((~keep).sum())
    else:
        scores = scorer.score([p for p in prompts for _ in range(2)], images, torch.zeros(2 * b, dtype=torch.long))
        best, _, keep, _ = select_pairs(scores.float().view(b, 2).cpu(), s.threshold, s.score_scale)
        preferred = best
        counts["dropped_gap"] = int((~keep).sum())
    if image_dir is not None:
        _save_images(images.cpu(), ids, image_dir)
    records = []
    for j in keep.nonzero().flatten().tolist():
        w, l = 2 * j + int(preferred[j]), 2 * j + 1 - int(preferred[j])
        for i, t, prev, x_t, x_prev in steps:
            records.append({"prompt": prompts[j], "timestep": t, "prev_timestep": prev, "chosen_x_t": x_t[w],
                            "chosen": x_prev[w], "rejected_x_t": x_t[l], "rejected": x_prev[l],
                            "trajectory": ids[j], "step": i})
    counts["kept"] = int(keep.sum())
    return records, counts


def _save_images(images: Tensor, ids: list[str], folder: Path) -> None:
    """Each trajectory pair's two final images as folder/{id}_0.png and {id}_1.png (for labelling)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for j, pair_id in enumerate(ids):
        for side in (0, 1):
            array = (images[2 * j + side].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(array).save(folder / f"{pair_id}_{side}.png")


# -- rounds: the online data source of the trainer -------------------------------------------------
TENSOR_FIELDS = ("x_t", "chosen", "rejected", "chosen_x_t", "rejected_x_t")
INT_FIELDS = ("timestep", "prev_timestep", "step")
JSON_FIELDS = ("prompt", "scores", "trajectory")


def save_round(records: list[dict[str, Any]], path: Path, fingerprint: str) -> None:
    """One round's records as stacked tensors in a safetensors file (atomic); prompts, scores
    and trajectory ids in its metadata."""
    from safetensors.torch import save_file

    tensors = {f: torch.stack([r[f] for r in records]).contiguous() for f in TENSOR_FIELDS if f in records[0]}
    tensors.update({f: torch.tensor([int(r[f]) for r in records]) for f in INT_FIELDS})
    meta = {f: json.dumps([r.get(f) for r in records]) for f in JSON_FIELDS}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(meta, fingerprint=fingerprint, count=str(len(records))))


def load_round(path: Path, fingerprint: str) -> list[dict[str, Any]] | None:
    """The records of a saved round, or None when the file is missing or from another run."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    columns = {f: json.loads(meta[f]) for f in JSON_FIELDS}
    records = []
    for i in range(int(meta["count"])):
        r = {f: v[i] for f, v in tensors.items() if f in TENSOR_FIELDS}
        r.update({f: int(tensors[f][i]) for f in INT_FIELDS})
        r.update({f: columns[f][i] for f in JSON_FIELDS if columns[f][i] is not None})
        records.append(r)
    return records


def run_fingerprint(cfg: Any) -> str:
    """What determines the rounds: the whole config except how long/verbosely the run goes."""
    data = to_dict(cfg)
    for key in ("max_steps", "resume", "progress", "log_every", "save_every", "keep_last", "validate_every",
                "tensorboard", "eval_every"):
        data["train"].pop(key, None)
    data.pop("source", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class RoundSampler:
    """The trainer's sampler for one round: the round's own seeded stream, from its first micro-step."""

    def __init__(self, num_records: int, seed: int, first_micro_step: int) -> None:
        self.stream, self.first = StreamSampler(num_records, seed), first_micro_step

    def micro_batch(self, micro_step: int, batch_size: int, rank: int, world_size: int) -> list[int]:
        return self.stream.micro_batch(micro_step - self.first, batch_size, rank, world_size)


def load_prompts(settings: Any, section: str = "spo") -> list[str]:
    """`<section>.prompt_list`, else the prompts of `<section>.prompts` (.txt one per line, or records
    with "prompt"); `section` names the config section in errors (spo, online)."""
    if settings.prompt_list:
        return [str(p) for p in settings.prompt_list]
    path = Path(settings.prompts)
    if not settings.prompts or not path.is_file():
        raise ConfigError(f"{section}.prompts: prompt file not found: '{settings.prompts}' (or give {section}.prompt_list)")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    else:
        rows = read_records(path)
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str) or not r["prompt"].strip()]
        if bad:
            raise DataError(f"{path}: row {bad[0]} has no 'prompt' text (got {rows[bad[0]].get('prompt')!r})")
        prompts = [str(r["prompt"]) for r in rows]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


class OnlineStepSource:
    """The trainer's data source (mmalign.types.DataSource) of `sd_spo` / `sdxl_spo`: optimizer
    step s trains on round r = s // spo.round_steps, sampled by the policy at the round's first step.

    Every process samples the same round (same seed, same weights): the records are identical
    everywhere and the round's sampler splits them across processes."""

    kind: str = "pair"

    def __init__(self, likelihood: StepLikelihood, cfg: Any) -> None:
        self.likelihood, self.cfg, self.settings = likelihood, cfg, cfg.spo
        self.prompts = load_prompts(cfg.spo)
        self.prompt_stream = StreamSampler(len(self.prompts), cfg.train.seed)
        self.labels = load_labels(cfg.spo.labels) if cfg.spo.labels else None
        self.scorer = None if self.labels is not None else load_step_scorer(cfg.spo.scorer, cfg)
        self.fingerprint = run_fingerprint(cfg)
        self.round = -1
        self.current: Round | None = None

    def describe(self) -> str:
        """What the trainer's start-up line says instead of "N examples from FILE"."""
        return f"online {self.settings.method} rounds of {self.settings.round_steps} steps"

    def round_path(self, r: int) -> Path:
        return Path(self.cfg.train.output_dir) / "rounds" / f"round_{r:05d}.safetensors"

    def records_for_step(self, step: int, model: torch.nn.Module, accelerator: Any) -> Round:
        """The round of optimizer step `step`: loaded (resume) or sampled with `model` (the unwrapped
        policy) when it begins, the same `Round` until it ends. Its sampler starts its seeded stream
        at the round's first micro-step."""
        s, t = self.settings, self.cfg.train
        r = step // s.round_steps
        if r != self.round or self.current is None:
            records = self.load_or_sample(r, model, accelerator)
            sampler = RoundSampler(len(records), mix_seed(t.seed, r, strides=(ROW, 1), wrap=False),
                                   r * s.round_steps * t.grad_accum)
            self.current, self.round = Round(records, sampler), r
        return self.current

    def load_or_sample(self, r: int, model: torch.nn.Module, accelerator: Any) -> list[dict[str, Any]]:
        """Round r's records: read back from its saved file (`spo.save_rounds`), else sampled,
        reported on the main process, and saved."""
        s = self.settings
        records = load_round(self.round_path(r), self.fingerprint) if s.save_rounds else None
        if records is not None:
            return records
        records, counts = self.sample(r, model, accelerator)
        if accelerator.is_main_process:
            why = {"dropped_gap": f"softmax gap <= {s.threshold}", "dropped_unlabelled": "no human label"}
            dropped = ", ".join(f"{v} ({why[k]})" for k, v in counts.items() if k in why and v)
            unit = "candidate steps" if s.method == "spo" else "trajectory pairs"
            print(f"[mmalign] {s.method} round {r}: {len(records)} transition pairs from {s.prompts_per_round} "
                  f"prompts; {unit}: kept {counts['kept']}, dropped {dropped or 'none'}")
        if not records:
            raise DataError(f"{s.method} round {r} kept no pairs: lower spo.threshold, raise spo.score_scale "
                            "or spo.prompts_per_round")
        if s.save_rounds and accelerator.is_main_process:
            save_round(records, self.round_path(r), self.fingerprint)
        return records

    def sample(self, r: int, model: torch.nn.Module,
               accelerator: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Round r with the current policy `model` (adapters on, eval mode, no grad): its records
        and the counts of kept and dropped candidates."""
        s, t = self.settings, self.cfg.train
        indices = self.prompt_stream.indices(r * s.prompts_per_round, s.prompts_per_round)
        prompts = [self.prompts[i] for i in indices]
        ids = [f"round{r}-{n}" for n in range(len(prompts))]
        generator = torch.Generator().manual_seed(mix_seed(t.seed, r, offset=17, wrap=False))
        acc = accelerator
        records, totals = [], {}
        bar = tqdm(range(0, len(prompts), s.sample_batch_size), desc=f"{s.method} round {r}",
                   disable=not (t.progress and acc.is_main_process), leave=False)
        with eval_mode(model), acc.autocast():
            for start in bar:
                chunk = prompts[start : start + s.sample_batch_size]
                if s.method == "spo":
                    got, counts = sample_spo_pairs(self.likelihood, model, chunk, self.scorer, generator, acc.device)
                else:
                    images = Path(t.output_dir) / "rounds" / f"images_{r:05d}" if s.save_images else None
                    got, counts = sample_d3po_pairs(self.likelihood, model, chunk, ids[start : start + len(chunk)],
                                                    self.scorer, self.labels, generator, acc.device, images)
                records += got
                for k, v in counts.items():
                    totals[k] = totals.get(k, 0) + v
        return records, totals


# -- families `sd_spo` and `sdxl_spo` (mmalign/families/) -------------------------------------------
def check_settings(cfg: Any) -> None:
    s = cfg.spo
    if cfg.data.train:
        raise ConfigError(f"data.train is not read by '{cfg.modality}': pairs are sampled online from spo.prompts")
    for name in ("prompts_per_round", "round_steps", "sample_batch_size", "num_steps"):
        if getattr(s, name) < 1:
            raise ConfigError(f"spo.{name} must be >= 1, got {getattr(s, name)}")
    if s.method == "spo" and s.candidates < 2:
        raise ConfigError(f"spo.candidates must be >= 2, got {s.candidates}")
    if s.sampler == "ddim" and s.eta <= 0:
        raise ConfigError("spo.eta must be > 0 with the ddim sampler: η = 0 is deterministic and has no likelihood")
    if not 0 <= s.threshold < 1:
        raise ConfigError(f"spo.threshold must be in [0, 1), got {s.threshold}")
    if not 0 <= s.first_step < s.num_steps:
        raise ConfigError(f"spo.first_step must be in [0, spo.num_steps), got {s.first_step}")
    if s.labels and s.method != "d3po":
        raise ConfigError("spo.labels (human labels per trajectory) is for spo.method d3po")


def build_step(cfg: Any, family_build: Any, trained: bool = True) -> tuple[torch.nn.Module, StepLikelihood, None]:
    """(UNet, StepLikelihood, None) on top of a base family's `build` (never from a cache: the
    sampler decodes with the VAE); its data comes from `build_source` (an `OnlineStepSource`)."""
    check_settings(cfg)
    model, base, _ = family_build(cfg, use_cache=False, trained=trained)
    return model, StepLikelihood(base, cfg.spo), None


def build_source(cfg: Any, likelihood: Likelihood) -> OnlineStepSource:
    """The online rounds of `sd_spo` / `sdxl_spo` for the likelihood `build_step` made."""
    if not isinstance(likelihood, StepLikelihood):
        raise TypeError(f"modality '{cfg.modality}' samples rounds with a StepLikelihood, "
                        f"got {type(likelihood).__name__}")
    return OnlineStepSource(likelihood, cfg)
