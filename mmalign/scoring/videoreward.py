"""VideoReward (VideoAlign, Liu et al. 2025; KwaiVGI/VideoAlign, MIT): a Qwen2-VL regression
reward model with three heads read at three special tokens (METHODS.md E.4).

The prompt (`detailed_special`, the released checkpoint's template) holds `<|VQ_reward|>`,
`<|MQ_reward|>` and `<|TA_reward|>` once each, in that order. With h (B, L, D) the last hidden
states of the language model and W (N, D) the bias-free head `rm_head`:

    r = (h W^T)[special-token positions]  -> (B, 3, N);   N = 3: diagonal, N = 1: squeeze  -> (B, 3)
    VQ' = (VQ - VQ_mean) / VQ_std  (MQ', TA' likewise; `inference_config` of model_config.json)
    overall = VQ' + MQ' + TA'

As in the official model, the language model runs with 1-D positions 0..L-1 on all three M-RoPE
axes (it calls the text model with `position_ids=None`, never `get_rope_index`), right padding.
`head` picks vq | mq | ta | overall; `normalise=false` gives the raw head outputs.

Released layout (`KlingTeam/VideoReward`, formerly `KwaiVGI/VideoReward`), PATH a folder or Hub id:

    model_config.json        data_config (fps, num_frames, max_frame_pixels, prompt_template_type),
                             model_config (model_name_or_path = the base, output_dim, ...),
                             peft_lora_config (lora_r, lora_alpha, use_rslora), inference_config
    checkpoint-<step>/model.pth   the PEFT-wrapped model's full state dict (latest step unless `step`)

The base (`base=`, default model_config.model_name_or_path, Qwen/Qwen2-VL-2B-Instruct) gives the
config and processor; the three special tokens are added to its tokenizer as the official code
does. LoRA is merged on load: W = W_base + (alpha / r) B A (alpha / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmalign.errors import ConfigError, DataError
from mmalign.scoring.base import Scorer, require_path, resolve_dtype

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
HEADS = ("vq", "mq", "ta", "overall")

PROMPT = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, "
    "Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three "
    "categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of "
    "the others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following "
    "sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, "
    "such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and "
    "easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
    "visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color "
    "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should "
    "convey a sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score "
    "should be the lowest possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, "
    "unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, "
    "textures, or missing body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, "
    "clothing should flow naturally with motion, and facial expressions should change appropriately "
    "(e.g., blinking, mouth movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different "
    "motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend "
    "naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas "
    "where the video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for "
    "motion quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial "
    "expressions like talking or blinking) align with the described prompt. The motion should match the "
    "prompt in terms of type, scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes "
    "checking if real-world locations or scenes are accurately represented, though some stylistic "
    "adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate "
    "how well the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus "
    "shifts) are consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
    "")


@dataclass
class ReleasedConfig:
    """What the scorer reads from a VideoReward folder's model_config.json."""

    base: str
    fps: float
    num_frames: int | None
    max_pixels: int
    output_dim: int
    lora_scale: float | None  # None: no LoRA in the checkpoint
    norm: dict[str, tuple[float, float]] | None  # head -> (mean, std)


def _section(config: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    value = config.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: no '{key}' object")
    return value


def read_released_config(path: Path) -> ReleasedConfig:
    """The released model_config.json (module docstring); anything this scorer cannot reproduce
    (another prompt template or pooling) is a one-line ConfigError naming the key."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable VideoReward model_config.json ({e})") from None
    data, model = _section(config, "data_config", path), _section(config, "model_config", path)
    peft = config.get("peft_lora_config") or {}
    if data.get("prompt_template_type", "detailed_special") != "detailed_special":
        raise ConfigError(f"{path}: data_config.prompt_template_type {data['prompt_template_type']!r} is not "
                          "implemented (only the released 'detailed_special')")
    if not model.get("use_special_tokens", True) or model.get("reward_token", "special") != "special":
        raise ConfigError(f"{path}: model_config.reward_token {model.get('reward_token')!r} is not implemented "
                          "(only the released special-token heads)")
    if data.get("sample_type", "uniform") != "uniform":
        raise ConfigError(f"{path}: data_config.sample_type {data['sample_type']!r} is not implemented (uniform)")
    output_dim = int(model.get("output_dim", 1))
    if output_dim not in (1, 3):
        raise ConfigError(f"{path}: model_config.output_dim {output_dim} is not 1 or 3")
    scale = None
    if peft.get("lora_enable"):
        r, alpha = float(peft["lora_r"]), float(peft["lora_alpha"])
        scale = alpha / (math.sqrt(r) if peft.get("use_rslora") else r)
    inference = config.get("inference_config")
    norm = None
    if inference:
        norm = {h: (float(inference[f"{h.upper()}_mean"]), float(inference[f"{h.upper()}_std"]))
                for h in ("vq", "mq", "ta")}
    frames = data.get("num_frames")
    return ReleasedConfig(str(model.get("model_name_or_path") or ""), float(data.get("fps") or 2.0),
                          None if frames is None else int(frames), int(data.get("max_frame_pixels", 200704)),
                          output_dim, scale, norm)


def checkpoint_file(folder: Path, step: int | None) -> Path:
    """folder/checkpoint-<step>/model.pth, the latest step when `step` is None."""
    steps = sorted((int(m.group(1)), p) for p in folder.glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    if step is not None:
        steps = [s for s in steps if s[0] == step]
    if not steps:
        want = f"checkpoint-{step}" if step is not None else "checkpoint-<step>"
        raise ConfigError(f"videoreward: no {want}/ folder in {folder}")
    path = steps[-1][1] / "model.pth"
    if not path.is_file():
        raise ConfigError(f"videoreward: {path} does not exist (only full model.pth checkpoints are implemented)")
    return path


def _current_name(key: str) -> str:
    """A key of the official (transformers 4.4x) Qwen2-VL layout in today's layout."""
    for old, new in (("visual.", "model.visual."), ("model.", "model.language_model.")):
        if key.startswith(old) and not key.startswith(("model.visual.", "model.language_model.")):
            return new + key[len(old):]
    return key


def merge_checkpoint(state: dict[str, Tensor], scale: float | None) -> dict[str, Tensor]:
    """The PEFT-wrapped state dict as plain weights: prefix `base_model.model.` dropped, each LoRA
    layer merged, W = base_layer.W + scale * lora_B @ lora_A, keys in today's Qwen2-VL layout."""
    plain = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    for key, value in plain.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            module, _, leaf = key.rpartition(".base_layer.")
            if leaf == "weight":
                a, b = plain.get(f"{module}.lora_A.default.weight"), plain.get(f"{module}.lora_B.default.weight")
                if a is None or b is None or scale is None:
                    raise ConfigError(f"videoreward checkpoint: {module} has a base layer without its LoRA pair")
                value = (value.double() + scale * (b.double() @ a.double())).to(value.dtype)
            key = f"{module}.{leaf}"
        out[_current_name(key)] = value
    return out


class VideoRewardModel(nn.Module):
    """Qwen2-VL + bias-free `rm_head` (N, D) read at the three special tokens -> (B, 3) raw rewards."""

    def __init__(self, vlm: Any, rm_head: nn.Linear, special_ids: Sequence[int]) -> None:
        super().__init__()
        self.vlm, self.rm_head, self.special_ids = vlm, rm_head, list(special_ids)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """batch: processor outputs, right padded (input_ids (B, L), pixel_values_videos, ...)."""
        ids = batch["input_ids"]
        positions = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
        hidden = self.vlm.model(**batch, position_ids=positions, use_cache=False).last_hidden_state
        logits = self.rm_head(hidden.to(self.rm_head.weight.dtype))  # (B, L, N)
        mask = torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))
        counts = mask.sum(1)
        if bool((counts != 3).any()):
            raise DataError(f"videoreward: prompts hold {counts.tolist()} reward tokens, expected 3 each")
        pooled = logits[mask].view(ids.shape[0], 3, -1)  # sequence order: VQ, MQ, TA
        return pooled.diagonal(dim1=1, dim2=2) if pooled.shape[-1] == 3 else pooled[..., 0]


def load_videoreward(folder: Path, config: ReleasedConfig, base: str | None, step: int | None,
                     dtype: torch.dtype, device: torch.device) -> tuple[VideoRewardModel, Any]:
    """(model, processor) from the released layout (module docstring); weights loaded with
    torch.load(weights_only=True), every key accounted for."""
    import transformers
    from transformers.initialization import no_init_weights

    base_name = base or config.base
    if not base_name:
        raise ConfigError("videoreward: model_config.model_name_or_path is empty; give base=FOLDER_OR_HUB_ID")
    base_dir = require_path(base_name, "videoreward base model (base=)")
    processor = transformers.AutoProcessor.from_pretrained(base_dir, local_files_only=True, padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    special_ids = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    vl_config = transformers.AutoConfig.from_pretrained(base_dir, local_files_only=True)
    state = torch.load(checkpoint_file(folder, step), map_location="cpu", weights_only=True, mmap=True)
    weights = merge_checkpoint(state, config.lora_scale)
    head = weights.pop("rm_head.weight", None)
    if head is None or head.shape[0] != config.output_dim:
        raise ConfigError(f"videoreward checkpoint: no rm_head.weight of {config.output_dim} rows")
    with no_init_weights():  # every weight comes from the checkpoint
        vlm = transformers.Qwen2VLForConditionalGeneration._from_config(vl_config, dtype=dtype)
    vlm.resize_token_embeddings(weights["model.language_model.embed_tokens.weight"].shape[0])
    if "lm_head.weight" not in weights and vl_config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]
    result = vlm.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"videoreward checkpoint does not match the base's Qwen2-VL: missing "
                          f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    rm_head = nn.Linear(head.shape[1], head.shape[0], bias=False)
    rm_head.weight.data.copy_(head)
    model = VideoRewardModel(vlm, rm_head, special_ids).to(device=device, dtype=dtype).eval()
    return model, processor


class VideoRewardScorer(Scorer):
    """score(prompts, videos) -> (N,) float32: the `head` reward of each video (module docstring).

    Options: head (vq|mq|ta|overall), normalise (true: the released mean/std), base (the Qwen2-VL
    base folder or Hub id), step (checkpoint step), fps / frames / max_pixels / min_pixels (video
    sampling, default the checkpoint's data_config), dtype, batch_size. `model`/`processor` and
    `config` replace loading (library callers, tests).
    """

    kinds = ("video",)

    def __init__(self, path: str | None = None, *, head: str = "overall", normalise: bool = True,
                 base: str | None = None, step: int | None = None, fps: float | None = None,
                 frames: int | None = None, max_pixels: int | None = None, min_pixels: int | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 2, dtype: str | None = None,
                 model: VideoRewardModel | None = None, processor: Any = None,
                 config: ReleasedConfig | None = None) -> None:
        from mmalign.scoring.judge import judge_markers
        from mmalign.scoring.qwen_frames import VIDEO_MIN_PIXELS, video_factor

        super().__init__(device=device, batch_size=batch_size)
        if head not in HEADS:
            raise ConfigError(f"videoreward: head {head!r} is not one of {', '.join(HEADS)}")
        if model is None:
            if path is None:
                raise ConfigError("videoreward: give the VideoReward folder or Hub id (PATH)")
            folder = require_path(path, "videoreward folder")
            config = read_released_config(folder / "model_config.json")
            model, processor = load_videoreward(folder, config, base, step, resolve_dtype(dtype), self.device)
        if config is None:
            raise ConfigError("videoreward: a model given without its ReleasedConfig (config=)")
        self.model, self.processor, self.config = model, processor, config
        processor.tokenizer.padding_side = "right"  # the official batches: 1-D positions need it
        self.head, self.normalise = head, bool(normalise)
        self.sampling = dict(fps=fps or config.fps, frames=frames if frames is not None else config.num_frames,
                             max_pixels=max_pixels or config.max_pixels, min_pixels=min_pixels or VIDEO_MIN_PIXELS,
                             factor=video_factor(processor))
        self.markers = judge_markers(processor)

    def prompt(self, condition: str) -> str:
        """The chat text of one video: the user turn [video, PROMPT(condition)], generation prompt
        added; special tokens and chat markers in the condition are escaped (`judge.neutralise`)."""
        from mmalign.scoring.judge import neutralise

        text = PROMPT.format(text_prompt=neutralise(condition, self.markers))
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def batch(self, conditions: Sequence[str], videos: Sequence[Any]) -> dict[str, Tensor]:
        """Processor outputs of one batch, right padded."""
        from mmalign.scoring.qwen_frames import sample_frames

        clips = [sample_frames(v, f"videoreward, output {i}", **self.sampling)[0] for i, v in enumerate(videos)]
        out = self.processor(text=[self.prompt(c) for c in conditions], videos=clips, padding=True,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in out.items() if isinstance(v, Tensor)}

    def rewards(self, conditions: Sequence[str], videos: Sequence[Any]) -> dict[str, Tensor]:
        """{"vq", "mq", "ta", "overall"} -> (B,) float64 (normalised when `normalise`)."""
        with torch.inference_mode():
            raw = self.model(self.batch(conditions, videos)).double().cpu()
        out = {}
        for j, name in enumerate(("vq", "mq", "ta")):
            mean, std = (self.config.norm or {}).get(name, (0.0, 1.0)) if self.normalise else (0.0, 1.0)
            out[name] = (raw[:, j] - mean) / std
        out["overall"] = out["vq"] + out["mq"] + out["ta"]
        return out

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        return self.rewards(conditions, outputs)[self.head].float()
