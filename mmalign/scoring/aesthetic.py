"""LAION aesthetic predictor v2 ("improved aesthetic predictor", `sac+logos+ava1-l14-linearMSE.pth`).

An MLP on the L2-normalised CLIP ViT-L/14 (OpenAI) image embedding (METHODS.md §5):

    768 -> 1024 -> (dropout .2) -> 128 -> (dropout .2) -> 64 -> (dropout .1) -> 16 -> 1

with NO activations between the linear layers (the released model is affine end to end), as
`nn.Sequential` indices 0, 2, 4, 6, 7: its state dict keys are `layers.0.weight`,
`layers.0.bias`, ..., `layers.7.bias`. Scores are on the AVA-like 1-10 scale (about 5-7 for
typical SDXL images). Text conditions are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmalign.errors import ConfigError
from mmalign.scoring.base import Scorer, features, load_images, require_path, resolve_dtype

HIDDEN = (1024, 128, 64, 16)


class AestheticMLP(nn.Module):
    """The released MLP: (N, input_size) L2-normalised embeddings -> (N, 1) scores."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


def load_aesthetic_mlp(path: str | Path) -> AestheticMLP:
    """The MLP from a released-layout state dict (`layers.0.weight` ...; .pth via
    `torch.load(weights_only=True)` or .safetensors); input size read from `layers.0.weight`."""
    from mmalign.scoring.clip import read_state_dict

    state = read_state_dict(path)
    if "layers.0.weight" not in state:
        raise ConfigError(f"{path}: not an aesthetic-predictor state dict (no 'layers.0.weight'; "
                          f"keys start {sorted(state)[:4]})")
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not fit the aesthetic MLP ({e})") from e
    return mlp.eval()


class _TransformersImageEncoder:
    """CLIP image embeddings from a transformers `CLIPModel` folder (openai/clip-vit-large-patch14)."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, CLIPModel

        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype
        self.dim = self.model.config.projection_dim

    def __call__(self, images: list[Any]) -> Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        return features(self.model.get_image_features(pixel_values=pixels))


class _OpenClipImageEncoder:
    """CLIP image embeddings from open_clip (a weights file + architecture, or an open_clip folder)."""

    def __init__(self, clip: Path, clip_model: str, device: torch.device, dtype: torch.dtype) -> None:
        from mmalign.scoring.clip import load_open_clip

        model, weights = (str(clip), None) if clip.is_dir() else (clip_model, clip)
        self.model, self.preprocess, _ = load_open_clip(model, weights, device, dtype)
        self.device, self.dtype = device, dtype
        self.dim = self.model.text_projection.shape[1] if self.model.text_projection is not None else None

    def __call__(self, images: list[Any]) -> Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels)


class AestheticScorer(Scorer):
    """LAION aesthetic v2 score (1-10 scale) of each image; conditions are ignored.

    path: the MLP weights (`sac+logos+ava1-l14-linearMSE.pth`); clip: the CLIP ViT-L/14 it was
    trained on: a transformers `CLIPModel` folder (openai/clip-vit-large-patch14), an open_clip
    folder, or an open_clip weights file with `clip_model` (default "ViT-L-14-quickgelu", the
    OpenAI architecture)."""

    def __init__(self, path: str, *, clip: str, clip_model: str = "ViT-L-14-quickgelu",
                 device: str | torch.device = "cpu", batch_size: int = 16, dtype: str | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.dtype = resolve_dtype(dtype)
        self.mlp = load_aesthetic_mlp(path).to(self.device)
        clip_path = require_path(clip, "aesthetic CLIP (clip=...)")
        if (clip_path / "config.json").exists():
            self.encoder: Any = _TransformersImageEncoder(clip_path, self.device, self.dtype)
        else:
            self.encoder = _OpenClipImageEncoder(clip_path, clip_model, self.device, self.dtype)
        if self.encoder.dim is not None and self.encoder.dim != self.mlp.input_size:
            raise ConfigError(f"aesthetic MLP {path} expects {self.mlp.input_size}-d CLIP embeddings but {clip} "
                              f"gives {self.encoder.dim}-d (the released MLP needs CLIP ViT-L/14: 768)")

    @torch.no_grad()
    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        embeddings = self.encoder(load_images(outputs, "aesthetic")).float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)  # the predictor was trained on unit vectors
        return self.mlp(embeddings).squeeze(-1)
