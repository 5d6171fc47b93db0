"""HPSv3 (Ma et al. 2025, "Towards Wide-Spectrum Human Preference Score"): a Qwen2-VL-7B reward model.

The released model (MizzenAI/HPSv3: `hpsv3/inference.py::HPSv3RewardInferencer`,
`model/qwen2vl_trainer.py::Qwen2VLRewardModelBT`, `config/HPSv3_7B.yaml`; METHODS.md §E.2) reads
one user turn [image, text] with

    text = INSTRUCTION.format(text_prompt=prompt)
           + "\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"

through the Qwen2-VL chat template (generation prompt added, right padding), the image resized to
about 256·28·28 = 200,704 pixels (qwen_vl_utils `smart_resize` with min = max pixels, bicubic), and

    h = Qwen2VL(tokens, image)[i*]              (D,) last hidden state at the `<|Reward|>` token i*
    (mu, log_sigma) = W3 relu(W2 relu(W1 h + b1) + b2) + b3    ("ranknet" head D -> 1024 -> 16 -> 2, fp32)
    score = mu                                  (sigma = exp(log_sigma) is the model's uncertainty)

M-RoPE positions are the plain token index on all three axes: the released forward embeds the image
itself and calls the decoder without `image_grid_thw`, so transformers (4.45.2, pinned by the
`hpsv3` package) falls back to 1-D positions; the model was trained and is scored that way.

Files: `path` is the folder / Hub id holding `HPSv3.safetensors` (or that file, or a torch
`.pth` state dict, `{"model": ...}`-wrapped or not); `base` is the Qwen2-VL-7B-Instruct folder /
Hub id whose config.json and processor the checkpoint was trained on. The checkpoint's keys may
be transformers 4.45's (`visual.*`, `model.*`) or >= 4.52's (`model.visual.*`,
`model.language_model.*`); `lm_head.weight` is not needed and is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmalign.errors import ConfigError
from mmalign.scoring.base import Scorer, load_images, require_path, resolve_dtype

CHECKPOINT = "HPSv3.safetensors"
BASE_FILES = ["*.json", "*.txt", "*.jinja"]  # a Hub base: its config and processor, not its 16 GB of weights
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291 - the released text keeps its trailing spaces
REWARD_SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


def hpsv3_text(prompt: str) -> str:
    """The user text of one request: the instruction with the prompt, then the `<|Reward|>` line."""
    return INSTRUCTION.format(text_prompt=prompt) + REWARD_SUFFIX


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen_vl_utils' (height, width): each a multiple of `factor`, the area brought into
    [min_pixels, max_pixels] keeping the aspect ratio (floor when shrinking, ceil when growing)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def split_checkpoint(state: dict[str, Tensor], where: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The released state dict -> (Qwen2VLModel state: `visual.*`, `language_model.*`; head state)."""
    backbone, head, unknown = {}, {}, []
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key[len("rm_head."):]] = value
        elif key.startswith(("visual.", "model.visual.")):
            backbone[key[key.index("visual."):]] = value
        elif key.startswith("model.language_model."):
            backbone[key[len("model."):]] = value
        elif key.startswith("model."):
            backbone["language_model." + key[len("model."):]] = value
        elif key != "lm_head.weight":
            unknown.append(key)
    if unknown or not head or "language_model.embed_tokens.weight" not in backbone:
        raise ConfigError(f"{where}: not an HPSv3 checkpoint (expected rm_head.*, visual.* and model.* keys; "
                          f"unexpected {sorted(unknown)[:4]})")
    return backbone, head


def reward_head(hidden: int, head: dict[str, Tensor], where: Path) -> nn.Sequential:
    """The "ranknet" head Linear(D, 1024)-ReLU-Dropout(0.05)-Linear(1024, 16)-ReLU-Linear(16, 2), fp32,
    with the released weights (keys 0.*, 3.*, 5.*)."""
    if "0.weight" not in head or "3.weight" not in head:
        raise ConfigError(f"{where}: rm_head.0 / rm_head.3 missing: not the ranknet head of HPSv3_7B.yaml")
    width, inner = head["0.weight"].shape[0], head["3.weight"].shape[0]
    module = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Dropout(0.05), nn.Linear(width, inner), nn.ReLU(),
                           nn.Linear(inner, 2))
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in head.items()}, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{where}: rm_head does not fit the ranknet head: missing {missing}, unexpected {unexpected}")
    return module.eval()


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, Tensor]]:
    """(weights file, flat state dict) from a folder / Hub id holding HPSv3.safetensors, or a file."""
    from mmalign.scoring.clip import read_state_dict

    where = require_path(path, "HPSv3 checkpoint", [CHECKPOINT])
    if where.is_dir():
        if not (where / CHECKPOINT).is_file():
            raise ConfigError(f"HPSv3 checkpoint: {where} holds no {CHECKPOINT}")
        where = where / CHECKPOINT
    state: Any = read_state_dict(where)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    return where, state


class HPSv3Scorer(Scorer):
    """HPSv3's mu (see module doc): an unbounded preference score, higher is better. path: HPSv3.safetensors or
    its folder / Hub id (MizzenAI/HPSv3); base: the Qwen2-VL-7B-Instruct folder / Hub id;
    pixels: the image area (default 256·28·28); dtype: the backbone's (default bfloat16, as
    released; the head is always fp32)."""

    def __init__(self, path: str, *, base: str = DEFAULT_BASE, pixels: int = PIXELS,
                 device: str | torch.device = "cpu", batch_size: int = 4, dtype: str | None = "bfloat16") -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoProcessor, Qwen2VLModel

        super().__init__(device=device, batch_size=batch_size)
        self.dtype, self.pixels = resolve_dtype(dtype), int(pixels)
        where, state = read_checkpoint(path)
        backbone, head = split_checkpoint(state, where)
        folder = require_path(base, "HPSv3 base (Qwen2-VL) folder", BASE_FILES)
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True, padding_side="right")
        self.processor.tokenizer.add_tokens([REWARD_TOKEN], special_tokens=True)
        self.reward_id = self.processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        rows = backbone["language_model.embed_tokens.weight"].shape[0]
        if self.reward_id >= rows:
            raise ConfigError(f"{where}: {REWARD_TOKEN} has id {self.reward_id} but the embedding has {rows} rows "
                              f"(is {folder} the base it was trained on?)")
        config.text_config.vocab_size = rows
        with init_empty_weights(include_buffers=False):
            self.model = Qwen2VLModel(config)
        missing, unexpected = self.model.load_state_dict(backbone, strict=False, assign=True)
        if missing or unexpected:
            raise ConfigError(f"{where}: weights do not fit {folder}'s Qwen2-VL: missing {sorted(missing)[:4]} "
                              f"({len(missing)}), unexpected {sorted(unexpected)[:4]} ({len(unexpected)})")
        self.model.to(self.device, self.dtype).eval()
        self.head = reward_head(config.text_config.hidden_size, head, where).to(self.device)
        image_processor = self.processor.image_processor
        self.factor = image_processor.patch_size * image_processor.merge_size

    def inputs(self, conditions: Sequence[str], outputs: Sequence[Any]) -> dict[str, Tensor]:
        """Processor inputs (right-padded ids, mask, pixel_values, image_grid_thw) of the chat turns."""
        images = []
        for image in load_images(list(outputs), "hpsv3"):
            height, width = smart_resize(image.height, image.width, self.factor, self.pixels, self.pixels)
            images.append(image.resize((width, height), resample=3))  # PIL bicubic, as qwen_vl_utils
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_text(c)}]}]
                 for c in conditions]
        texts = self.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt")

    @torch.no_grad()
    def mu_log_sigma(self, conditions: Sequence[str], outputs: Sequence[Any]) -> Tensor:
        """(N, 2) head output [mu, log sigma] at each row's `<|Reward|>` token, float32."""
        enc = self.inputs(conditions, outputs)
        ids = enc["input_ids"].to(self.device)
        found = (ids == self.reward_id).sum(1)
        if (found != 1).any():
            row = int((found != 1).nonzero()[0])
            raise ValueError(f"hpsv3: row {row} holds {int(found[row])} {REWARD_TOKEN} tokens, expected 1 "
                             "(a prompt must not contain it)")
        positions = torch.arange(ids.shape[1], device=self.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
        hidden = self.model(input_ids=ids, attention_mask=enc["attention_mask"].to(self.device),
                            pixel_values=enc["pixel_values"].to(self.device, self.dtype),
                            image_grid_thw=enc["image_grid_thw"].to(self.device), position_ids=positions,
                            use_cache=False).last_hidden_state
        return self.head(hidden[ids == self.reward_id].float())

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        return self.mu_log_sigma(conditions, outputs)[:, 0]
