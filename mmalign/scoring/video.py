"""A frame-based video scorer: an image scorer's mean over frames sampled evenly from each video.

    score(prompt, video) = (1/k) Σ_j s_image(prompt, frame_{i_j}),   i = round(linspace(0, T - 1, k))

with k = min(`frames`, T) (`data.video.frame_indices`, the frames training samples) and s_image a
registered image scorer (`scorer`: one of IMAGE_SCORERS) loaded from PATH with its own options
(`processor`, `model`, `tokenizer`, `base`, ...: every other option goes to it and is checked there).
The scale is the image scorer's. Spec:
`video_frames=/models/PickScore_v1,scorer=pickscore,frames=8,processor=/models/CLIP-ViT-H-14`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError
from mmalign.scoring.base import Scorer

IMAGE_SCORERS = ("clipscore", "pickscore", "hpsv2", "hpsv21", "aesthetic", "imagereward", "hpsv3")


class FrameMeanScorer(Scorer):
    """Mean of an image scorer over `frames` evenly spaced frames of each video (module docstring)."""

    kinds = ("video",)
    wraps_scorer = True

    def __init__(self, path: str, *, scorer: str = "pickscore", frames: int = 8, device: str | torch.device = "cpu",
                 batch_size: int = 16, **image_options: Any) -> None:
        from mmalign.scoring import ScorerSpec, load_scorer

        super().__init__(device=device, batch_size=batch_size)
        if scorer not in IMAGE_SCORERS:
            raise ConfigError(f"video_frames: scorer {scorer!r} is not an image scorer ({', '.join(IMAGE_SCORERS)})")
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ConfigError(f"video_frames: frames must be a positive integer, got {frames!r}")
        self.image_scorer = load_scorer(ScorerSpec(scorer, path, image_options), device=device, batch_size=batch_size)
        self.frames = frames

    def video_frames(self, video: Any, where: str) -> list[Any]:
        """The k = min(frames, T) frames of a video path (or frame folder) that are scored."""
        from mmalign.data.video import frame_indices, load_video

        every = load_video(video, where)
        return [every[i] for i in frame_indices(len(every), min(self.frames, len(every)))]

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        picked = [self.video_frames(v, f"video_frames, output {i}") for i, v in enumerate(outputs)]
        prompts: Sequence[str] = [c for c, frames in zip(conditions, picked) for _ in frames]
        scores = self.image_scorer.score(prompts, [f for frames in picked for f in frames])
        return torch.stack([part.mean() for part in scores.split([len(f) for f in picked])])
