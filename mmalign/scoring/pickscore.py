"""PickScore (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic preferences.

Loaded with transformers `CLIPModel` + `AutoProcessor` from local folders (METHODS.md §5).
The released reference computes, for one prompt and its candidate images,

    s_i = exp(logit_scale) · <t / |t|, x_i / |x_i|>        (logit_scale = log 100 -> s in [-100, 100])
    p_i = softmax_i(s_i)                                    (probabilities over the candidates)

`PickScoreScorer.score` returns the raw `s_i` (about 18-23 for SDXL images), which does not
depend on the other candidates; `pickscore_probs` turns them into the per-prompt softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmalign.scoring.base import Scorer, features, load_images, require_path, resolve_dtype, unique_texts


def pickscore_from_embeddings(text_emb: Tensor, image_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """(N, D), (N, D), scalar log-scale -> (N,) `exp(logit_scale) · cos(text, image)`."""
    text_emb = text_emb.float() / text_emb.float().norm(dim=-1, keepdim=True)
    image_emb = image_emb.float() / image_emb.float().norm(dim=-1, keepdim=True)
    return torch.as_tensor(logit_scale, dtype=torch.float32).exp() * (text_emb * image_emb).sum(-1)


def pickscore_probs(scores: Tensor, groups: Sequence[Any]) -> Tensor:
    """Softmax of raw PickScores within each group (one group = the candidates of one prompt).

    scores: (N,); groups: N hashable group keys (e.g. prompt_index) -> (N,) probabilities that
    sum to 1 within each group."""
    if len(groups) != scores.numel():
        raise ValueError(f"{len(groups)} group keys for {scores.numel()} scores")
    probs = torch.empty_like(scores, dtype=torch.float32)
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for idx in members.values():
        probs[idx] = torch.softmax(scores[idx].float(), dim=0)
    return probs


class PickScoreScorer(Scorer):
    """Raw PickScore `exp(logit_scale) · cos(text, image)` (see module doc).

    path: the PickScore model folder (`yuvalkirstain/PickScore_v1`); processor: the folder of
    its processor when the model folder has none (the reference uses
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s). Text is truncated at 77 tokens as in the reference.
    """

    what = "PickScore model"  # names the folder in errors (subclasses load other CLIP folders)

    def __init__(self, path: str, *, processor: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 16, dtype: str | None = None, max_length: int = 77) -> None:
        from transformers import AutoProcessor, CLIPModel

        super().__init__(device=device, batch_size=batch_size)
        self.dtype = resolve_dtype(dtype)
        self.folder = folder = require_path(path, f"{self.what} folder")
        proc_folder = require_path(processor, f"{self.what} processor folder") if processor else folder
        self.processor = AutoProcessor.from_pretrained(proc_folder, local_files_only=True)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        self.max_length = min(int(max_length), self.model.config.text_config.max_position_embeddings)

    def pixel_values(self, images: Sequence[Any]) -> Tensor:
        """(N, 3, S, S) CLIP inputs of PIL images / paths / bytes, through the CLIP processor."""
        pixels = self.processor(images=load_images(list(images), "pickscore"), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """(N, D) projected text embeddings (unnormalised); each distinct prompt encoded once."""
        texts, index = unique_texts(list(prompts))
        tokens = self.processor(text=texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        emb = features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device)))
        return emb[index.to(self.device)]

    @torch.no_grad()
    def embeddings(self, conditions: list[str], outputs: list[Any]) -> tuple[Tensor, Tensor]:
        """(N, D) text and (N, D) image projected embeddings (unnormalised)."""
        image_emb = features(self.model.get_image_features(pixel_values=self.pixel_values(outputs)))
        return self.text_embeddings(conditions), image_emb

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        text_emb, image_emb = self.embeddings(conditions, outputs)
        return pickscore_from_embeddings(text_emb, image_emb, self.model.logit_scale.detach())
