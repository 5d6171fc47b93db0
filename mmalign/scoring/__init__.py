"""Scorers: (condition, output) -> number, loaded from local paths (DESIGN.md "Scorer").

    name        class                                    scale (higher is better)
    clipscore   clip:CLIPScoreScorer      2.5 * max(cos, 0), Hessel et al. [0, 2.5] (not torchmetrics' 100*cos)
    pickscore   pickscore:PickScoreScorer exp(logit_scale) * cos = 100 * cos, about 18-23 for SDXL
    hpsv2       clip:HPSScorer            raw cosine under the HPS v2 checkpoint, about 0.25-0.30
    hpsv21      clip:HPSScorer            same with the HPS v2.1 checkpoint
    aesthetic   aesthetic:AestheticScorer LAION aesthetic v2 MLP, 1-10 scale, about 5-7 for SDXL
    clap        clap:ClapScorer           cos(text, audio) in [-1, 1]
    judge       judge:JudgeScorer         pointwise 1-10 verdict, or pairwise win rate in [0, 1]
    openai_judge openai_judge:OpenAIJudgeScorer  the same judge over an OpenAI-compatible chat API
                (PATH: MODEL@http://HOST:PORT/v1; also written judge=openai:MODEL@URL)
    step_aware  step_aware:StepAwareScorer PickScore conditioned on the timestep t (SPO; t = 0 here)
    toyworld_checker  mmalign.toyworld.checker:CheckerScorer  the toy world's exact checker, [0, 1]
                (PATH: score | colour | shape; nothing is loaded)
    annotations annotations:AnnotationScorer  -(hallucinated objects) + recall * R against the row's "objects"
                (PATH: an object vocabulary file or coco; nothing is loaded)
    claims      claims:ClaimJudgeScorer   -(mentioned objects a local VLM judge says are absent), RLAIF-V style
    geneval     geneval:GenEvalScorer     1 when the image passes GenEval's checks for its prompt, else 0
                (PATH: GenEval metadata jsonl; detector=toyworld | owlv2 | grounding-dino,detector_path=DIR,clip=DIR)
    text_length text_stats:TextLengthScorer  answer length in words | chars (PATH), or -|len - target|;
                a programmatic test/demo scorer for text (nothing is loaded)
    video_frames video:FrameMeanScorer   mean of an image scorer (scorer=pickscore|clipscore|...) over
                frames=8 frames spread evenly over each video; the image scorer's scale

    http        remote:HttpScorer         whatever the server at PATH (a URL) answers; options timeout, retries
    python:REF  plugin                   a user's class or function (`python:pkg.mod:Name=ARG`,
                                         `python:/path/file.py:fn`), mmalign/scoring/plugin.py

A scorer spec (the `mmalign score --scorer` syntax) is `NAME=PATH[,key=value...][:weight]`:
`pickscore=/models/PickScore_v1,processor=/models/CLIP-ViT-H-14:1.0`. Options are passed to
the class as keyword arguments (values read as YAML scalars: 16 -> int, true -> bool); the
option `as=COLUMN` renames the column (two judges: `judge=/m/a,as=judge_a`).

`combine` merges several scorers' columns into one ranking score.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError

SCORERS: dict[str, str] = {
    "clipscore": "mmalign.scoring.clip:CLIPScoreScorer",
    "pickscore": "mmalign.scoring.pickscore:PickScoreScorer",
    "hpsv2": "mmalign.scoring.clip:HPSScorer",
    "hpsv21": "mmalign.scoring.clip:HPSScorer",
    "aesthetic": "mmalign.scoring.aesthetic:AestheticScorer",
    "clap": "mmalign.scoring.clap:ClapScorer",
    "judge": "mmalign.scoring.judge:JudgeScorer",
    "openai_judge": "mmalign.scoring.openai_judge:OpenAIJudgeScorer",
    "step_aware": "mmalign.scoring.step_aware:StepAwareScorer",
    "toyworld_checker": "mmalign.toyworld.checker:CheckerScorer",
    "text_length": "mmalign.scoring.text_stats:TextLengthScorer",
    "annotations": "mmalign.scoring.annotations:AnnotationScorer",
    "claims": "mmalign.scoring.claims:ClaimJudgeScorer",
    "http": "mmalign.scoring.remote:HttpScorer",
    "video_frames": "mmalign.scoring.video:FrameMeanScorer",
    "geneval": "mmalign.scoring.geneval:GenEvalScorer",
    "imagereward": "mmalign.scoring.imagereward:ImageRewardScorer",
    "hpsv3": "mmalign.scoring.hpsv3:HPSv3Scorer",
    "videoreward": "mmalign.scoring.videoreward:VideoRewardScorer",
    "unifiedreward": "mmalign.scoring.unifiedreward:UnifiedRewardScorer",
}


@dataclass
class ScorerSpec:
    """One parsed `NAME=PATH[,key=value...][:weight]`; `column` is the manifest column suffix."""

    name: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    column: str = ""

    def __post_init__(self) -> None:
        self.column = self.column or self.name


def _option_value(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float)) else text  # paths, names, 'null' stay text


def _split_weight(name: str, rest: str) -> tuple[str, float]:
    """`rest` without a trailing `:weight`, and the weight (1.0 without one). A URL's port is no
    weight: `http=http://host:8000` keeps its port, `http=http://host:8000/score:0.5` weighs 0.5."""
    head, sep, tail = rest.rpartition(":")
    if not sep:
        return rest, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return rest, 1.0
    url = head.split(",")[0]
    if "://" in url and "/" not in url.split("://", 1)[1]:
        return rest, 1.0  # the tail is the URL's port
    return head, weight


def parse_spec(spec: str) -> ScorerSpec:
    """'hpsv21=/m/HPS_v2.1_compressed.pt,dtype=float16:0.5' -> ScorerSpec(name, path, options, weight).
    The weight is a trailing `:number` (a path's own colons are kept). `python:REF[=ARG...]` names a
    user's scorer (mmalign/scoring/plugin.py); its column defaults to REF's last name, lower-cased."""
    from mmalign.scoring.plugin import PREFIX

    plugin = spec.startswith(PREFIX)
    if "=" not in spec and not plugin:
        raise ConfigError(f"scorer spec {spec!r}: expected NAME=PATH[,key=value...][:weight]")
    name, _, rest = spec.partition("=")
    name = name.strip() if plugin else name.strip().lower()
    if not plugin and name not in SCORERS:
        raise ConfigError(f"scorer spec {spec!r}: unknown scorer {name!r}; known: {', '.join(SCORERS)}, "
                          "python:module:Name, http=URL")
    rest, weight = _split_weight(name, rest) if rest else (rest, 1.0)
    path, *pairs = rest.split(",")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"scorer spec {spec!r}: option {pair!r} is not key=value")
        options[key.strip()] = _option_value(value.strip())
    column = str(options.pop("as", name.rpartition(":")[2].lower() if plugin else name))
    if not path and not plugin:
        raise ConfigError(f"scorer spec {spec!r}: no PATH")
    if not math.isfinite(weight):
        raise ConfigError(f"scorer spec {spec!r}: weight {weight} is not finite")
    return ScorerSpec(name, path.strip(), options, weight, column)


def scorer_class(name: str) -> type:
    """The class registered under `name` (imported on demand: heavy libraries load only then),
    or the user's class behind `python:REF` (a function wrapped as a FunctionScorer)."""
    from mmalign.scoring.plugin import PREFIX, plugin_class

    if name.startswith(PREFIX):
        return plugin_class(name)
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}, python:module:Name")
    module, cls = SCORERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_scorer(spec: str | ScorerSpec, **defaults: Any) -> Any:
    """A scorer instance from a spec; `defaults` (device, batch_size, ...) apply unless the spec
    sets them. An option the class does not take is a ConfigError naming it."""
    from mmalign.scoring.plugin import PREFIX, load_plugin

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.name == "judge" and spec.path.startswith("openai:"):  # judge=openai:MODEL@URL
        spec = ScorerSpec("openai_judge", spec.path, spec.options, spec.weight, spec.column)
    if spec.name.startswith(PREFIX):
        return load_plugin(spec.name, spec.path, spec.options, defaults)
    cls = scorer_class(spec.name)
    params = inspect.signature(cls.__init__).parameters
    accepted = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    unknown = [] if cls.wraps_scorer else sorted(set(spec.options) - accepted)  # the wrapped scorer checks them
    if unknown:
        raise ConfigError(f"scorer {spec.name}: unknown option(s) {', '.join(unknown)}; "
                          f"it takes {', '.join(sorted(accepted - {'generate', 'model', 'processor'}))}")
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    return cls(spec.path, **{**kwargs, **spec.options})


def znormalise(values: Tensor) -> Tensor:
    """(v - mean) / std over the finite entries (population std); NaN stays NaN; a constant
    column becomes 0 (it cannot rank anything)."""
    values = values.double()
    finite = torch.isfinite(values)
    if not finite.any():
        return values.float()
    mean = values[finite].mean()
    std = values[finite].std(unbiased=False)
    z = (values - mean) / std if std > 0 else torch.zeros_like(values)
    return torch.where(finite, z, torch.full_like(values, math.nan)).float()


def combine(scores: dict[str, Tensor], weights: dict[str, float] | None = None, znorm: bool = False) -> Tensor:
    """sum_k w_k * s_k (s_k z-normalised per scorer when `znorm`) -> (N,); NaN where any scorer
    is NaN. weights default to 1 per scorer; a weight for a scorer not given is an error."""
    if not scores:
        raise ValueError("combine needs at least one score column")
    weights = {k: 1.0 for k in scores} if weights is None else dict(weights)
    extra = set(weights) - set(scores)
    if extra:
        raise ValueError(f"weights for scorers without scores: {sorted(extra)}")
    sizes = {v.numel() for v in scores.values()}
    if len(sizes) != 1:
        raise ValueError(f"score columns differ in length: { {k: v.numel() for k, v in scores.items()} }")
    total = torch.zeros(sizes.pop(), dtype=torch.float64)
    for name, values in scores.items():
        values = znormalise(values) if znorm else values
        total += weights.get(name, 1.0) * values.double()
    return total.float()
