"""Typed run configuration: dataclasses loaded from YAML, validated on load.

An unknown key is an error that names the key and the nearest valid one; a value of
the wrong type is an error that names the key; `section.key=value` overrides from the
command line are applied before validation (values parsed as YAML scalars).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmalign.config_sampling import GRPOConfig, NFTConfig, OnlineConfig, StepConfig  # noqa: F401 (re-exported)
from mmalign.errors import ConfigError  # defined in mmalign.errors; still importable from here


@dataclass
class ModelConfig:
    path: str = ""  # local directory loadable with from_pretrained (relative paths: to the config file, then the package)
    dtype: str = "float32"  # weights dtype: float32, bfloat16, float16
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # text LMs: answer tokens per LM-head chunk, so no (B, T, V) logits are built (0: full logits).
    # 256: a chunk's backward holds ~5 (chunk, V) float32 tensors (2.6 GB at 1024 x 128,256; 0.6 GB
    # at 256), measured by `python -m benchmarks.text_memory`; same log-probs at any chunk size.
    lm_head_chunk: int = 256


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class DataConfig:
    # jsonl, parquet, or a Hugging Face `datasets` folder saved with save_to_disk; or a Hub dataset
    # id org/name[@revision][:[subset:]split] (mmalign/data/hub_data.py); or a list of them (same
    # format and kind), read in order as one dataset
    train: str | list[str] = ""
    eval: str | list[str] = ""
    streaming: int = 0  # Hub dataset ids: N > 0 streams the split and keeps its first N rows; 0 = whole split
    format: str = "auto"  # auto (by file type), or a dataset reader: pickapic, rlhf_v, rlaif_v, povid, mdpo, trl_vlm
    max_length: int = 512  # prompt + answer tokens; answers are truncated, prompts never
    max_prompt_length: int = 0  # 0: no limit; otherwise prompts longer than this are an error
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template
    # text LMs: run each batch as one packed row (positions restart per sequence, attention kept
    # within each): no padding is computed; equal log-probs (checked once per model)
    padding_free: bool = False
    # K > 0: offline records of similar length share micro-batches (less padding): each window of
    # K x global micro-batch (train.batch_size x processes) entries of the epoch's order is sorted by
    # length and cut into batches, seeded-shuffled, the longest batch first (mmalign/data/length_grouping.py)
    group_by_length: int = 0
    # decode the images of jsonl/json/parquet data at load, skipping (and counting) unreadable rows:
    # auto (files of <= 5,000 rows), all, none (mmalign/data/media_checks.py)
    verify_media: str = "auto"
    allow_outside_paths: bool = False  # media paths may be absolute, hold '..' or symlink out of the data folder


@dataclass
class LossConfig:
    # a registered loss, or a list of them combined as Σ_k weights[k]·loss_k (MPO, e.g.
    # [dpo, bco_pair, sft] with weights [0.8, 0.2, 1.0]; RPO = [dpo, sft], [1, α])
    name: str | list[str] = "dpo"
    weights: list[float] | None = None  # one per entry of a list `name`; None = all 1
    beta: float = 0.1
    label_smoothing: float = 0.0  # cdpo / robust / aot / aot_unpaired / cpo / cpo_simpo ε; exo_pair ε (> 0: 1e-3)
    discopop_tau: float = 0.05  # discopop τ: temperature of the logistic/exponential mix
    # f-DPO (TRL's f_divergence_type): each log-ratio u becomes s(u) before delta = s(u_c) - s(u_r):
    # reverse_kl (u, plain DPO), forward_kl (1 - e^-u), js_divergence (log 2 + log σ(u)),
    # alpha_divergence ((e^{(α-1)u} - 1)/(α-1), α = f_alpha_divergence_coef). Only for the losses
    # built on delta alone (dpo, cdpo, robust, soft, ipo, hinge, exo_pair, discopop, sigmoid_norm).
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    # LD-DPO (TRL's ld_alpha; text/VLM, pairs): tokens past the shorter answer's length count α times
    # in both answers' log-likelihoods (1 = plain sum, 0 = drop the tail); None = off.
    ld_alpha: float | None = None
    # WPO (TRL's use_weighting; text/VLM, pairs): every pair's loss is multiplied by w(c)·w(r),
    # w(y) = exp(mean_t [log p_t(y_t) − log Σ_v p_t(v)²]) under the policy, detached.
    use_weighting: bool = False
    gamma: float = 0.0  # simpo / cpo_simpo target margin (TRL's CPO simpo_gamma default: 0.5)
    sft_weight: float = 0.0  # RPO: α · NLL(chosen) added to the preference loss
    cpo_alpha: float = 1.0  # cpo / cpo_simpo: weight of the chosen NLL (TRL's cpo_alpha); orpo's λ is beta
    dpop_lambda: float = 50.0  # dpop: λ of the penalty λ·max(0, -(log π(c) - log ref(c))) inside σ
    mapo_timesteps: int = 1000  # mapo: T scaling the margin (the scheduler's num_train_timesteps)
    cpl_lambda: float = 0.5  # cpl: conservative bias λ in (0, 1] on the rejected segment (1 = unbiased)
    desirable_weight: float = 1.0  # kto λD
    undesirable_weight: float = 1.0  # kto λU
    # kto z = max(0, E[policy - reference log-ratio]) estimated on mismatched (prompt, other
    # completion) items as TRL does, or on the batch's own items.
    kto_reference_point: str = "mismatched"
    # RLHF-V dense DPO: > 0 re-scores each answer as a γ-weighted token mean where the tokens
    # that differ between chosen and rejected weigh γ (RLHF-V uses γ > 1); 0 = off.
    dense_gamma: float = 0.0
    # spo / d3po: the likelihood ratios r = exp(policy - reference) are clipped to [1-clip, 1+clip]; 0 = off.
    # grpo: the importance ratio ρ = exp(logp_θ - logp_old) is clipped to [1-clip, 1+clip] (Flow-GRPO ε 1e-4).
    clip: float = 0.1
    # β_KL: grpo's weight of KL_t = mean_dims((μ_θ - μ_ref)²)/(2 std_t²) (Flow-GRPO 0.004-0.04); nft's of
    # mean((v_θ - v_ref)²) (DiffusionNFT config.train.beta 1e-4; the NFT β itself is loss.beta)
    kl_beta: float = 0.0
    # advantages clipped to ±adv_clip_max: grpo's in the loss; nft's in its online `rewards` rounds,
    # also its A_max (r = A / A_max / 2 + 0.5 and the loss's A_max scale)
    adv_clip_max: float = 5.0
    # VLM image terms (mmalign/train/image_terms.py), added with image_term_weight: mdpo (mDPO's
    # conditional term on a corrupted image + anchor -log σ(β hc - anchor_delta)), realign (the
    # chosen answer with its image ≻ with another example's image); none = off.
    image_term: str = "none"
    image_term_weight: float = 1.0
    anchor_delta: float = 0.0  # mDPO's δ
    corruption: str = "crop"  # mdpo's corrupted image: crop (mDPO default), noise, mask
    corruption_crop_scale: list[float] = field(default_factory=lambda: [0.01, 0.2])  # area kept by crop
    corruption_noise_step: int = 500  # DDPM step t of 1000 for noise
    corruption_mask_ratio: float = 0.3  # fraction of pixels (or patches) masked
    corruption_mask_patch: int = 1  # 1: single pixels; > 1: patch x patch squares


@dataclass
class ReferenceConfig:
    # auto: lora_disabled with LoRA, frozen copy otherwise. precomputed: reference
    # log-likelihoods computed once before training and cached in output_dir.
    strategy: str = "auto"  # auto, frozen, lora_disabled, precomputed, none
    sync_every: int = 0  # TR-DPO: every N optimizer steps ref <- (1-alpha) ref + alpha policy; 0 = off
    sync_alpha: float = 0.6


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw, adamw8bit (bitsandbytes), adafactor, sgd
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"  # constant, linear, cosine (all after warm-up)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    # adamw / sgd: torch's fused kernels (one kernel for all parameters; CUDA, and CPU in recent torch).
    # The update is the same math; it differs from the default in float rounding only.
    fused: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # examples (pairs) per process per micro-step
    grad_accum: int = 1
    mixed_precision: str = "no"  # no, bf16, fp16
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the start and the end (when data.eval is set)
    eval_batch_size: int = 32
    save_every: int = 0  # 0: save only at the end
    keep_last: int = 2  # checkpoints kept in output_dir/checkpoints
    validate_every: int = 0  # every N steps, the modality's validation samples (e.g. images) in output_dir/validation
    resume: bool = False  # continue from the latest checkpoint in output_dir
    # a step whose gradient norm is NaN/inf is skipped (gradients zeroed, counted in the metric
    # skipped_steps) up to N times in a run; 0: the first one stops the run naming the step
    skip_nonfinite_steps: int = 0
    cpu: bool = False  # force CPU even when an accelerator is present
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    # experiment trackers through accelerate (tensorboard, wandb, trackio, mlflow): scalars as train/<key>,
    # eval/<key>, validation images as media; metrics.jsonl is written regardless (mmalign/train/trackers.py)
    report_to: list[str] = field(default_factory=list)
    progress: bool = True
    # torch.compile backend for the trained model: "" = off, "inductor" (kernels fused; the first
    # steps are slow while it compiles), "aot_eager" (graph capture only: checks a model compiles).
    compile: str = ""
    # FSDP2 (`fully_shard`) over the processes, one unit per block (mmalign/train/sharding.py);
    # without a process group (1 process, no torchrun) the model stays whole
    fsdp: bool = False
    # checkpoints of a sharded run: "full" (gathered, the main process writes model.safetensors as an
    # unsharded run does) or "sharded" (every process writes its own shards, no full copy anywhere;
    # mmalign/train/sharded_checkpoint.py); unsharded runs always write full ones
    fsdp_checkpoint: str = "full"


@dataclass
class DiffusionConfig:
    """Image preprocessing and ELBO settings of the diffusion modalities (`sd`, `sdxl`)."""

    resolution: int = 512  # shortest side resized to this, then a square crop of this size
    crop: str = "center"  # center, random (offset drawn per pair from the step's generator)
    random_flip: bool = False  # horizontal flip, decided per pair (both images flipped together)
    caption_dropout: float = 0.2  # probability that a pair's caption becomes the null prompt (keeps CFG working)
    null_prompt: str = "empty"  # empty: encode(""), as the official training; zeros: zero embeddings (SDXL sampling default)
    prediction_type: str = ""  # "" reads scheduler.config.prediction_type; or epsilon, v_prediction, sample
    vae_dtype: str = "float32"  # the VAE runs outside autocast in this dtype (fp16 SDXL VAEs overflow to NaN)
    vae_path: str = ""  # optional separate local VAE folder (e.g. the SDXL fp16-fix VAE); default <model.path>/vae
    vae_batch_size: int = 0  # images per VAE encode call; 0 = the whole batch at once
    variant: str = ""  # weights variant of the pipeline folder (e.g. fp16), "" = default files
    num_frames: int = 81  # video families (wan): frames sampled evenly over each clip, 4k + 1 (WanPipeline default)
    # two-expert Wan 2.2 (A14B): the experts trained, of [high, low] (transformer, transformer_2); the others stay frozen
    train_experts: list[str] = field(default_factory=lambda: ["high", "low"])
    width: int = 0  # video families (wan): crop width in pixels, `resolution` its height (832x480: 832); 0 = square
    # `mmalign cache` writes VAE latent distributions (+ flips) and deduplicated text embeddings here;
    # training then reads them and loads no VAE or text encoder. "" = encode every step.
    cache_dir: str = ""
    cache_dtype: str = "float16"  # storage of latent mean/std and embeddings: float16 (half the disk) or float32 (exact)
    cache_shard_size: int = 256  # records per latent shard (and captions per text shard)
    # train.validate_every: images for these prompts x seeds (a PNG grid per step in output_dir/validation)
    validation_prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    validation_steps: int = 25  # sampler steps (Euler, from the scheduler's config)
    validation_guidance: float = 5.0  # classifier-free guidance scale (1 = off)


@dataclass
class AudioConfig:
    """Clips of the audio diffusion modalities (`audioldm2`, `tango`; mmalign/data/audio.py).

    Each clip is read, down-mixed to mono, resampled to the model's rate, cropped or zero-padded
    to `seconds`, normalised as AudioLDM does and turned into the AudioLDM log-mel."""

    seconds: float = 10.24  # clip length trained on (AudioLDM / Tango: 10.24 s = 1024 mel frames)
    min_seconds: float = 0.0  # shorter clips are a data error (0: any clip is padded with silence)
    sample_rate: int = 0  # 0: the vocoder's (vocoder/config.json), else 16000
    n_mels: int = 0  # 0: the vocoder's model_in_dim, else 64
    n_fft: int = 1024
    hop_length: int = 160
    fmin: float = 0.0
    fmax: float = 8000.0
    normalize: bool = True  # zero mean, peak 0.5 (AudioLDM / Tango normalize_wav)
    prompt_cache: int = 4096  # encoded prompts kept in memory (frozen text encoders: exact)


@dataclass
class Config:
    modality: str = "causal_lm"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    spo: StepConfig = field(default_factory=StepConfig)
    online: OnlineConfig | None = None  # online rounds (None: data from files or the family's own source)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # the *_grpo families' rounds
    nft: NFTConfig = field(default_factory=NFTConfig)  # DiffusionNFT (loss.name: nft)
    audio: AudioConfig = field(default_factory=AudioConfig)
    source: str = ""  # the YAML file it was loaded from (set by load_config)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "loss.kto_reference_point": ("mismatched", "batch"),
    "loss.image_term": ("none", "mdpo", "realign"),
    "loss.corruption": ("crop", "noise", "mask"),
    "reference.strategy": ("auto", "frozen", "lora_disabled", "precomputed", "none"),
    "optim.name": ("adamw", "adamw8bit", "adafactor", "sgd"),
    "optim.scheduler": ("constant", "linear", "cosine"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.compile": ("", "inductor", "aot_eager", "eager", "cudagraphs"),
    "train.fsdp_checkpoint": ("full", "sharded"),
    "diffusion.crop": ("center", "random"),
    "diffusion.null_prompt": ("empty", "zeros"),
    "diffusion.prediction_type": ("", "epsilon", "v_prediction", "sample"),
    "diffusion.vae_dtype": ("float32", "bfloat16", "float16"),
    "diffusion.cache_dtype": ("float16", "float32"),
    "spo.method": ("spo", "d3po"),
    "spo.sampler": ("ddim", "ddpm"),
    "grpo.sde_type": ("sde", "cps", "dance"),
    "grpo.timestep_selection": ("first", "random"),
    "online.strategy": ("best_worst", "margin", "ranked", "soft", "rewards"),
    "online.scorer_device": ("auto", "cpu", "cuda"),
    "online.reference_update": ("none", "every_round"),
}


def _nearest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation, converting int -> float where harmless."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            if arm is type(None) and value is None:
                return None
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        for arm in arms[:-1]:  # the first arm that accepts the value; the last one names the error
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                pass
        return _coerce(value, arms[-1], where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" as a string
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _section(hint: Any) -> type | None:
    """The dataclass of a config section annotated `Section` or `Section | None`, else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return None


# old key -> where it lives now (one knob each, GRPO and NFT)
MOVED = {"online.adv_clip_max": "loss.adv_clip_max", "online.global_std": "grpo.global_std"}


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if where in MOVED:
            raise ConfigError(f"config key '{where}' moved to '{MOVED[where]}'")
        if key not in names:
            raise ConfigError(f"unknown config key '{where}'{_nearest(key, names)}")
        hint, section = hints[key], _section(hints[key])
        if section is not None:
            optional = section is not hint
            kwargs[key] = None if optional and value is None else from_dict(section, value or {}, prefix=f"{where}.")
        else:
            kwargs[key] = _coerce(value, hint, where)
            allowed = CHOICES.get(where)
            if allowed and kwargs[key] not in allowed:
                raise ConfigError(f"{where}: '{kwargs[key]}' is not one of {', '.join(allowed)}")
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not valid YAML") from None
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML run config, apply overrides, validate, and return a `Config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _read_yaml(path)
    data = apply_overrides(data, overrides or [])
    data.pop("source", None)
    cfg = from_dict(Config, data)
    cfg.source = str(path)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> Any:
    """The YAML document in `path`; malformed YAML is a one-line ConfigError naming the line."""
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None


def validate(cfg: Config) -> None:
    """Cross-field checks that a single field cannot express (`mmalign/config_checks.py`)."""
    from mmalign.config_checks import validate_config

    validate_config(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


PACKAGE_PREFIX = "pkg://"


def resolve_path(path: str, what: str = "model.path") -> str:
    """`pkg://NAME` (files shipped with mmalign), a local path, or a Hub id `org/name[@revision]`
    resolved to its snapshot folder in the user's cache (mmalign/hub.py; HF_HUB_OFFLINE honoured)."""
    from mmalign.hub import resolve_path as resolve

    return resolve(path, what)
