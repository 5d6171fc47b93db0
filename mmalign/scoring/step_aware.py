"""Step-aware preference model (SPO's SPM, METHODS.md §2 "Step-aware"): a PickScore-style CLIP
whose image embedding is conditioned on the diffusion timestep t of the image it scores.

SPO scores the predicted x̂0 of noisy candidates at step t; a plain PickScore was trained on
clean images only. The scorer here is a transformers `CLIPModel` plus a small time module:

    e_t   = MLP(sinusoidal(t))                                    (TimestepEmbedder, as DiT / SPO)
    shift, scale = Linear(SiLU(e_t))                              (zero-initialised)
    h     = pooled vision output · (1 + scale) + shift           (before the visual projection)
    s     = exp(logit_scale) · cos(text_proj(text), visual_proj(h))   (PickScore, METHODS.md §5)

The last time layer starts at zero, so a fresh scorer IS the CLIP it starts from (PickScore
exactly, at every t); training (`train_step_aware.py`) fine-tunes CLIP and the time module with
the PickScore objective on x̂0 predictions at random t. (SPO's reference conditions every layer
of the vision tower with adaLN; modulating the pooled output only is a lighter variant.)

A saved scorer is one folder: the CLIP weights and processor at the top (`save_pretrained`, so
the folder also loads as a plain `pickscore=FOLDER`, without the time module),
`time_module.safetensors` and `step_aware.json`. A folder without `step_aware.json` (e.g.
PickScore_v1) loads with a fresh, zero time module.

`score(prompts, images, timesteps=None) -> (N,)`: images (N, 3, H, W) in [0, 1] (what the SPO
sampler hands over) or a list of PIL images / paths (what `mmalign score` hands over);
timesteps (N,) long, None = 0 (clean images, the timestep-agnostic use). Registered as
`step_aware` in `mmalign.scoring.SCORERS`; `spo.scorer: step_aware=FOLDER[,device=cuda]` passes
the timesteps through.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmalign.errors import ConfigError
from mmalign.scoring.base import chunks
from mmalign.scoring.pickscore import PickScoreScorer

CONFIG_NAME = "step_aware.json"
TIME_WEIGHTS = "time_module.safetensors"
FORMAT = "mmalign-step-aware-v1"


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(N,) timesteps -> (N, dim) [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / (dim/2))
    (the GLIDE / DiT sinusoidal embedding); an odd dim gets a zero last column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimeModulation(nn.Module):
    """t -> (shift, scale), each (N, width), for the pooled vision output (module doc).

    frequency_dim: size of the sinusoidal embedding; width: the vision tower's hidden size."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.width, self.frequency_dim = width, frequency_dim
        self.embed = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        nn.init.normal_(self.embed[0].weight, std=0.02)
        nn.init.normal_(self.embed[2].weight, std=0.02)
        nn.init.zeros_(self.modulation[1].weight)  # zero: a fresh scorer is the CLIP it starts from
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale = self.modulation(self.embed(timestep_embedding(timesteps, self.frequency_dim))).chunk(2, dim=-1)
        return shift, scale


def pair_loss(chosen: Tensor, rejected: Tensor, label: Tensor) -> Tensor:
    """PickScore objective on a pair: cross-entropy of softmax([s_c, s_r]) against [p, 1 - p].

    chosen, rejected: (B,) scores; label: (B,) p = probability the chosen image is preferred
    (1 for a decided pair, 0.5 for a tie). Returns (B,) = -(p log q_c + (1 - p) log q_r)."""
    logq = torch.log_softmax(torch.stack([chosen, rejected], dim=-1).float(), dim=-1)
    p = label.to(logq.device, torch.float32)
    return -(p * logq[:, 0] + (1 - p) * logq[:, 1])


class StepAwareScorer(PickScoreScorer):
    """PickScore conditioned on the timestep (module doc). Also an `nn.Module` holder for training:
    `parameters()`, `train()`, `eval()` cover the CLIP and the time module.

    path: a folder saved by `save` or any transformers CLIP folder (fresh time module);
    processor: the processor folder when `path` has none (PickScore_v1 uses CLIP-ViT-H-14's)."""

    takes_timesteps = True  # spo.scorer: do not wrap in TimestepAgnostic
    what = "step-aware scorer"

    def __init__(self, path: str, *, processor: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 16, dtype: str | None = None, max_length: int = 77,
                 frequency_dim: int = 256) -> None:
        super().__init__(path, processor=processor, device=device, batch_size=batch_size, dtype=dtype,
                         max_length=max_length)
        folder = self.folder
        self.info = self._read_config(folder)
        width = self.model.config.vision_config.hidden_size
        with torch.random.fork_rng(devices=[]):  # a fresh time module is the same in every run
            torch.manual_seed(0)
            self.time = TimeModulation(width, int(self.info.get("frequency_dim", frequency_dim)))
        if (folder / TIME_WEIGHTS).is_file():
            from safetensors.torch import load_file

            self.time.load_state_dict(load_file(str(folder / TIME_WEIGHTS)))
        self.time.to(self.device, self.dtype).eval()

    @staticmethod
    def _read_config(folder: Path) -> dict[str, Any]:
        path = folder / CONFIG_NAME
        if not path.is_file():
            return {}
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT:
            raise ConfigError(f"{path}: format {info.get('format')!r} is not {FORMAT!r}")
        return info

    # -- nn.Module-like -------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.time.parameters()]

    def train(self, mode: bool = True) -> "StepAwareScorer":
        self.model.train(mode)
        self.time.train(mode)
        return self

    def eval(self) -> "StepAwareScorer":
        return self.train(False)

    # -- embeddings and scores (differentiable) ---------------------------------------------------
    def pixel_values(self, images: Tensor | Sequence[Any]) -> Tensor:
        """(N, 3, S, S) CLIP inputs from (N, 3, H, W) in [0, 1] or PIL images / paths: through the
        CLIP processor on 8-bit PIL images, exactly as `PickScoreScorer` prepares images."""
        if isinstance(images, Tensor):
            from mmalign.modalities.step_sampler import to_pil

            images = to_pil(images)
        return super().pixel_values(images)

    @torch.no_grad()
    def embeddings(self, conditions: list[str], outputs: list[Any]) -> tuple[Tensor, Tensor]:
        """PickScore's (N, D) text and image embeddings, the image's at t = 0 (clean images)."""
        t = torch.zeros(len(outputs), dtype=torch.long)
        return self.text_embeddings(conditions), self.image_embeddings(self.pixel_values(outputs), t)

    def image_embeddings(self, pixel_values: Tensor, timesteps: Tensor) -> Tensor:
        """(N, D) = visual_projection(pooled · (1 + scale(t)) + shift(t)) of pixel_values (N, 3, S, S)."""
        pooled = self.model.vision_model(pixel_values=pixel_values, return_dict=True).pooler_output
        shift, scale = self.time(timesteps.to(self.device))
        return self.model.visual_projection(pooled * (1 + scale.to(pooled.dtype)) + shift.to(pooled.dtype))

    def scores(self, prompts: Sequence[str], pixel_values: Tensor, timesteps: Tensor) -> Tensor:
        """(N,) exp(logit_scale) · cos(text, image_t), with gradients (training)."""
        text = self.text_embeddings(prompts).float()
        image = self.image_embeddings(pixel_values, timesteps).float()
        text = text / text.norm(dim=-1, keepdim=True)
        image = image / image.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.float().exp() * (text * image).sum(-1)

    @torch.no_grad()
    def score(self, conditions: Sequence[str], outputs: Tensor | Sequence[Any],
              timesteps: Tensor | None = None) -> Tensor:
        """(N,) float32 scores on the CPU of N images at their timesteps (None: t = 0)."""
        n = len(outputs)
        if len(conditions) != n:
            raise ValueError(f"{len(conditions)} conditions for {n} outputs")
        t = torch.zeros(n, dtype=torch.long) if timesteps is None else torch.as_tensor(timesteps).long().reshape(-1)
        if t.numel() != n:
            raise ValueError(f"{t.numel()} timesteps for {n} outputs")
        if n == 0:
            return torch.zeros(0)
        parts = [self.scores(list(conditions[s]), self.pixel_values(outputs[s]), t[s])
                 for s in chunks(n, self.batch_size)]
        return torch.cat([p.float().cpu() for p in parts])

    # -- saving ---------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the scorer to `folder` atomically: everything goes to a hidden sibling folder that
        then replaces `folder` (a kill leaves the previous folder intact). An existing folder must be
        empty, a saved scorer, or hold only a training `checkpoint/` (it is replaced)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.is_dir() and not (folder / CONFIG_NAME).is_file() and set(os.listdir(folder)) - {"checkpoint"}:
            raise ConfigError(f"{folder} exists and is not a step-aware scorer folder: it would be replaced; "
                              "choose a new or empty output folder")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = folder.with_name(f".{folder.name}.tmp-{os.getpid()}"), folder.with_name(f".{folder.name}.old")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.time.state_dict().items()},
                      str(tmp / TIME_WEIGHTS))
            info = dict(self.info, **(extra or {}), format=FORMAT, frequency_dim=self.time.frequency_dim)
            self.info = info  # a later save keeps what this one recorded
            (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
