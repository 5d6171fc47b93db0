"""ImageReward (Xu et al. 2023): BLIP with a linear reward head, trained on ImageRewardDB rankings.

The released model (THUDM/ImageReward, `ImageReward/ImageReward.py::ImageReward.score`, METHODS.md
§E.1) scores one (prompt, image) pair as

    v = ViT(x)                                  (1 + P, Dv) image tokens (BLIP ViT-L/16, 224 px: P = 196)
    h = BERT(ids, mask; cross-attention to v)   (T, 768), T = 35 tokens (padded / truncated)
    r = MLP(h[0])                               768 -> 1024 -> 128 -> 64 -> 16 -> 1, NO activations
                                                (they are commented out; the dropouts are off in eval)
    reward = (r - 0.16717362830052426) / 1.0333394966054072

standardised by the mean / std constants of the released code (higher is better). This module maps the released
state dict (`ImageReward.pt`: `blip.visual_encoder.*` timm-style ViT keys, `blip.text_encoder.*`
BLIP med.py BERT keys, `mlp.layers.{0,2,4,6,7}`) onto transformers' `BlipVisionModel` and
`BlipTextModel` (the same modules, renamed), and scores pairs directly: the reference's batched
`inference_rank` encodes each image once per prompt, not the N x N grid some trainers build.

Files: the folder (or Hub id) holding `ImageReward.pt` + `med_config.json`, or the weights file
itself with `med_config.json` beside it. The tokenizer is BERT's (`bert-base-uncased`; option
`tokenizer=`) with the `[DEC]` bos and `[ENC]` tokens BLIP adds; prompts are padded to 35 tokens
and truncated there, input ids used as given (`[CLS]` first). Images: resize the short side to
224 (bicubic), centre crop 224, CLIP mean / std. The ViT's width, depth, patch and image size are
read from the weights; its head count is width / 64 (ViT-L: 16) unless `vision_heads` is given.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmalign.errors import ConfigError
from mmalign.scoring.base import Scorer, load_images, require_path, resolve_dtype

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
WEIGHTS_NAMES = ("ImageReward.pt", "ImageReward.safetensors")
MED_CONFIG = "med_config.json"
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"
TOKENIZER_FILES = ["*.json", "*.txt"]  # a Hub tokenizer: vocab.txt and configs, not the BERT weights
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_PREFIX, TEXT_PREFIX, MLP_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
# released timm-style ViT keys -> transformers BlipVisionModel keys
VISION_RENAMES = [(r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
                  (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^norm\.", "post_layernorm."),
                  (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
                  (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
                  (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
                  (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
                  (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp.")]
IGNORED_KEYS = ("embeddings.position_ids",)  # a buffer older transformers saved; rebuilt here


def normalise_reward(raw: Tensor) -> Tensor:
    """(r - 0.16717362830052426) / 1.0333394966054072: the released standardisation of the MLP output."""
    return (raw - REWARD_MEAN) / REWARD_STD


def imagereward_files(path: str | Path, med_config: str | None = None) -> tuple[Path, Path]:
    """(weights file, med_config.json) from a folder / Hub id holding both, or from the weights file."""
    where = require_path(path, "ImageReward checkpoint", [*WEIGHTS_NAMES, MED_CONFIG, *TOKENIZER_FILES])
    weights = where
    if where.is_dir():
        found = [where / n for n in WEIGHTS_NAMES if (where / n).is_file()]
        if not found:
            raise ConfigError(f"ImageReward checkpoint: {where} holds none of {', '.join(WEIGHTS_NAMES)}")
        weights = found[0]
    config = require_path(med_config, "ImageReward med_config") if med_config else weights.parent / MED_CONFIG
    if not config.is_file():
        raise ConfigError(f"ImageReward: no {MED_CONFIG} beside {weights} (give med_config=FILE)")
    return weights, config


def split_state(state: dict[str, Tensor],
                where: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
    """The released state dict -> (BlipVisionModel state, BlipTextModel state, MLP (weight, bias) in order).
    `blip.vision_proj` / `blip.text_proj` (BLIP's ITC projections) are not used by the reward."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith(VISION_PREFIX):
            name = key[len(VISION_PREFIX):]
            for pattern, repl in VISION_RENAMES:
                name = re.sub(pattern, repl, name)
            vision[name] = value
        elif key.startswith(TEXT_PREFIX):
            text[key[len(TEXT_PREFIX):]] = value
        elif key.startswith(MLP_PREFIX):
            mlp[key[len(MLP_PREFIX):]] = value
    layers = sorted({int(k.split(".")[0]) for k in mlp})
    if not vision or not text or not layers:
        raise ConfigError(f"{where}: not an ImageReward state dict (expected blip.visual_encoder.*, "
                          "blip.text_encoder.* and mlp.layers.* keys)")
    try:
        head = [(mlp[f"{i}.weight"], mlp[f"{i}.bias"]) for i in layers]
    except KeyError as e:
        raise ConfigError(f"{where}: mlp.layers.{e.args[0]} is missing") from None
    return vision, text, head


def vision_config(state: dict[str, Tensor], heads: int | None) -> Any:
    """BlipVisionConfig read off the ViT weights (width, depth, patch, image size; eps 1e-6 as timm's)."""
    from transformers import BlipVisionConfig

    width, _, patch, _ = state["embeddings.patch_embedding.weight"].shape
    grid = math.isqrt(state["embeddings.position_embedding"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    heads = heads or max(1, width // 64)
    if width % heads:
        raise ConfigError(f"ImageReward: vision width {width} is not divisible by vision_heads={heads}")
    return BlipVisionConfig(hidden_size=width, intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=heads, image_size=grid * patch,
                            patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu", attention_dropout=0.0)


def text_config(path: Path, encoder_width: int) -> Any:
    """BlipTextConfig from BLIP's med_config.json (a BertConfig with `add_cross_attention: true`);
    the cross-attention width is the ViT's, as `BLIP_Pretrain` sets it."""
    from transformers import BlipTextConfig

    med = json.loads(path.read_text())
    if not med.get("add_cross_attention"):
        raise ConfigError(f"{path}: add_cross_attention must be true (the reward reads the image through it)")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "layer_norm_eps", "max_position_embeddings", "pad_token_id")
    missing = [k for k in keys if k not in med]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    return BlipTextConfig(**{k: med[k] for k in keys}, encoder_hidden_size=encoder_width, is_decoder=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def load_strict(module: nn.Module, state: dict[str, Tensor], where: Path, part: str) -> None:
    """Assign `state` into a meta-initialised `module`; a missing or extra key is a ConfigError naming it."""
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError(f"{where}: {part} weights do not fit: missing {sorted(missing)[:4]} ({len(missing)}), "
                          f"unexpected {sorted(unexpected)[:4]} ({len(unexpected)})")


class RewardMLP(nn.Module):
    """The released head: Linear layers applied in turn with nothing between them (eval mode)."""

    def __init__(self, layers: list[tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.linears = nn.ModuleList()
        for weight, bias in layers:
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data, linear.bias.data = weight.float().clone(), bias.float().clone()
            self.linears.append(linear)

    def forward(self, features: Tensor) -> Tensor:
        """(N, D) -> (N,) raw reward r."""
        for linear in self.linears:
            features = linear(features)
        return features.squeeze(-1)


def imagereward_transform(size: int) -> Any:
    """Resize(size, bicubic) -> CenterCrop(size) -> RGB -> ToTensor -> CLIP Normalize (the reference's `_transform`)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda image: image.convert("RGB"), ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])


def imagereward_tokenizer(name: str) -> Any:
    """BERT's tokenizer with BLIP's `[DEC]` bos and `[ENC]` tokens (`init_tokenizer`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(require_path(name, "ImageReward tokenizer", TOKENIZER_FILES),
                                        local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_tokens(["[ENC]"], special_tokens=True)
    return tok


class ImageRewardScorer(Scorer):
    """ImageReward's standardised reward, unbounded, higher is better (see module doc). path: the ImageReward
    folder / Hub id (`THUDM/ImageReward`) or its weights file; tokenizer: a BERT tokenizer folder or
    Hub id (default the path's own tokenizer files if it has them, else bert-base-uncased);
    med_config: the BERT config when it is not beside the weights."""

    def __init__(self, path: str, *, tokenizer: str | None = None, med_config: str | None = None,
                 vision_heads: int | None = None, device: str | torch.device = "cpu", batch_size: int = 16,
                 dtype: str | None = None) -> None:
        from accelerate import init_empty_weights
        from transformers import BlipTextModel, BlipVisionModel

        from mmalign.scoring.clip import read_state_dict

        super().__init__(device=device, batch_size=batch_size)
        self.dtype = resolve_dtype(dtype)
        weights, config_path = imagereward_files(path, med_config)
        vision_sd, text_sd, head = split_state(read_state_dict(weights), weights)
        vcfg = vision_config(vision_sd, vision_heads)
        with init_empty_weights(include_buffers=False):
            self.vision = BlipVisionModel(vcfg)
            self.text = BlipTextModel(text_config(config_path, vcfg.hidden_size), add_pooling_layer=False)
        load_strict(self.vision, vision_sd, weights, "vision")
        load_strict(self.text, text_sd, weights, "text")
        self.vision.to(self.device, self.dtype).eval()
        self.text.to(self.device, self.dtype).eval()
        self.mlp = RewardMLP(head).to(self.device).eval()
        own = (weights.parent / "vocab.txt").is_file() or (weights.parent / "tokenizer.json").is_file()
        self.tokenizer = imagereward_tokenizer(tokenizer or (str(weights.parent) if own else DEFAULT_TOKENIZER))
        self.preprocess = imagereward_transform(vcfg.image_size)

    def tokens(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(N, 35) input ids and attention mask: padding to 35, truncation at 35, as the reference."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def raw_rewards(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        """(N,) r = MLP(BERT(ids; ViT(x))[:, 0]) before the standardisation, float32."""
        images = torch.stack([self.preprocess(im) for im in load_images(outputs, "imagereward")])
        image_embeds = self.vision(pixel_values=images.to(self.device, self.dtype)).last_hidden_state
        ids, mask = self.tokens(conditions)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
        hidden = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask).last_hidden_state
        return self.mlp(hidden[:, 0].float())

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        return normalise_reward(self.raw_rewards(conditions, outputs))
