"""open_clip scorers: CLIPScore (Hessel et al. 2021) and HPSv2 / HPSv2.1 (Wu et al. 2023).

Both take an open_clip architecture and a local weights file (METHODS.md §5):

- `model`: a built-in open_clip name ("ViT-B-32-quickgelu", "ViT-H-14"), a JSON model config
  (open_clip's `{"embed_dim", "vision_cfg", "text_cfg"}`, optionally wrapped as
  `{"model_cfg": ..., "preprocess_cfg": ...}`), or an open_clip folder holding
  `open_clip_config.json` and its weights (open_clip's `local-dir:` layout);
- `weights`: a state dict file (.safetensors, .bin/.pt/.pth via `torch.load(weights_only=True)`,
  or an OpenAI TorchScript archive). A `{"state_dict": {...}}` wrapper and `module.` key
  prefixes (the released HPS checkpoints, saved from DDP) are unwrapped; loading is strict.

Tokenizers are open_clip's (the BPE vocabulary ships inside the package: no download).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError
from mmalign.scoring.base import Scorer, cosine, load_images, require_path, resolve_dtype, unique_texts

HPS_IMAGE_SIZE = 224


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from a weights file: safetensors, a torch pickle loaded with
    `weights_only=True` (optionally `{"state_dict": ...}`-wrapped, keys optionally `module.`-
    prefixed), or an OpenAI TorchScript archive (its parameters, no code is run)."""
    path = require_path(path, "weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an OpenAI JIT archive is not a plain pickle
            torchscript = zipfile.is_zipfile(path) and any(
                n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())
            if not torchscript:
                raise ConfigError(f"{path}: not a loadable state dict ({e})") from e
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{path}: expected a state dict (or {{'state_dict': ...}}), got {type(state).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_open_clip_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Strictly load `read_state_dict(path)` into an open_clip model; a mismatch names the keys."""
    state = read_state_dict(path)
    scale = getattr(model, "logit_scale", None)
    if "logit_scale" in state and scale is not None and state["logit_scale"].ndim != scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(scale.shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not fit the open_clip model: missing {sorted(missing)[:5]} "
                          f"({len(missing)}), unexpected {sorted(unexpected)[:5]} ({len(unexpected)})")


def _model_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = json.loads(path.read_text())
    model_cfg, preprocess_cfg = cfg.get("model_cfg", cfg), cfg.get("preprocess_cfg", {})
    if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"{path}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    if "hf_model_name" in model_cfg["text_cfg"] or "timm_model_name" in model_cfg["vision_cfg"]:
        raise ConfigError(f"{path}: hf/timm towers are not supported from a JSON config (they may download); "
                          "use an open_clip folder (local-dir layout) instead")
    return model_cfg, preprocess_cfg


def load_open_clip(model: str, weights: str | Path | None, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Any]:
    """(model in eval mode on `device`, its eval image transform, its tokenizer); see module doc."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    source = Path(model).expanduser()
    preprocess_cfg: dict[str, Any] = {}
    if source.suffix == ".json":
        model_cfg, preprocess_cfg = _model_config(require_path(source, "open_clip model config"))
        clip = open_clip.CLIP(**model_cfg)
        tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77))
    elif source.is_dir():
        name = f"local-dir:{source}"
        clip, tokenizer = open_clip.create_model(name, device="cpu"), open_clip.get_tokenizer(name)
    else:
        if model not in open_clip.list_models():
            raise ConfigError(f"open_clip model {model!r} is neither a built-in name, a .json config nor a folder")
        clip, tokenizer = open_clip.create_model(model, pretrained=None, device="cpu"), open_clip.get_tokenizer(model)
    if weights is not None:
        load_open_clip_weights(clip, weights)
    size = clip.visual.image_size
    cfg = {"size": size if isinstance(size, int) else tuple(size), **open_clip.get_model_preprocess_cfg(clip),
           **preprocess_cfg}
    cfg = {k: v for k, v in cfg.items() if k in PreprocessCfg.__dataclass_fields__}
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    return clip.to(device=device, dtype=dtype).eval(), transform, tokenizer


def hps_transform(image: Any, size: int = HPS_IMAGE_SIZE, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> Tensor:
    """HPSv2's eval preprocessing: resize (bicubic) so the LONGER side is `size`, pad to a centred
    square with 0 (black), normalise with the OpenAI CLIP mean/std; no centre crop, so nothing
    of a non-square image is cut. PIL image -> (3, size, size). (HPSv2 skips the pad when the
    longer side already equals `size`; padding here always keeps non-square batches stackable.)"""
    import torchvision.transforms.functional as F
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import InterpolationMode

    width, height = image.size
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):
        image = F.resize(image, [new_h, new_w], InterpolationMode.BICUBIC)
    pad_h, pad_w = size - new_h, size - new_w
    image = F.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    tensor = F.to_tensor(image.convert("RGB"))
    return F.normalize(tensor, list(mean or OPENAI_DATASET_MEAN), list(std or OPENAI_DATASET_STD))


class _OpenClipScorer(Scorer):
    """Shared body: embed images (`self.preprocess`) and texts, return the per-pair cosine."""

    def __init__(self, model: str, weights: str | Path | None, *, device: str | torch.device = "cpu",
                 batch_size: int = 16, dtype: str | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.dtype = resolve_dtype(dtype)
        self.model, self.preprocess, self.tokenizer = load_open_clip(model, weights, self.device, self.dtype)

    @torch.no_grad()
    def embeddings(self, conditions: list[str], outputs: list[Any]) -> tuple[Tensor, Tensor]:
        """(N, D) image and (N, D) text embeddings (unnormalised); one text pass per distinct prompt."""
        images = torch.stack([self.preprocess(im) for im in load_images(outputs, type(self).__name__)])
        image_emb = self.model.encode_image(images.to(self.device, self.dtype))
        texts, index = unique_texts(conditions)
        text_emb = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return image_emb.float(), text_emb.float()[index.to(self.device)]

    def cosines(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        return cosine(*self.embeddings(conditions, outputs))


def clip_score(cos: Tensor, weight: float = 2.5) -> Tensor:
    """Hessel et al. (2021) CLIPScore: `w · max(cos, 0)` with w = 2.5 -> range [0, 2.5].
    torchmetrics' `CLIPScore` reports `max(100 · cos, 0)` instead (range [0, 100]); divide
    ours by 2.5 and multiply by 100 to compare."""
    return weight * cos.clamp(min=0)


class CLIPScoreScorer(_OpenClipScorer):
    """CLIPScore on an open_clip model, Hessel's scale: `2.5 · max(cos(image, text), 0)`, in
    [0, 2.5] (NOT torchmetrics' `max(100 · cos, 0)`; see `clip_score`).

    path: the weights file (or an open_clip folder); model: the architecture (default
    "ViT-B-32-quickgelu", Hessel's OpenAI ViT-B/32, whose weights use QuickGELU).
    prefix: prepended to every prompt; Hessel et al. used "A photo depicts" for captions.
    """

    def __init__(self, path: str, *, model: str = "ViT-B-32-quickgelu", prefix: str = "", **kwargs: Any) -> None:
        folder = Path(path).expanduser().is_dir()
        super().__init__(path if folder else model, None if folder else path, **kwargs)
        self.prefix = prefix

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        texts = [f"{self.prefix} {c}".strip() if self.prefix else c for c in conditions]
        return clip_score(self.cosines(texts, outputs))


class HPSScorer(_OpenClipScorer):
    """Human Preference Score v2 / v2.1: the raw cosine of open_clip ViT-H-14 image and text
    embeddings under the HPS checkpoint (papers' tables report it x100). Range [-1, 1],
    about 0.25-0.30 for typical SDXL images.

    path: the HPS checkpoint (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt`), a
    `{"state_dict": {...}}` file whose keys may carry `module.`; model: "ViT-H-14" (a JSON
    config for tests). Images use `hps_transform` (longest side 224 + pad, no crop).
    """

    def __init__(self, path: str, *, model: str = "ViT-H-14", **kwargs: Any) -> None:
        super().__init__(model, path, **kwargs)
        size = self.model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        self.preprocess = lambda image: hps_transform(image, size)

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        return self.cosines(conditions, outputs)
