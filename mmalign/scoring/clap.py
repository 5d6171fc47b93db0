"""CLAP text-audio similarity (Wu et al. 2023; transformers `ClapModel` + `ClapProcessor`).

score = cos(text embedding, audio embedding) in [-1, 1] (METHODS.md §5). Audio is read with
`soundfile`, mixed to mono and resampled with `soxr` to the feature extractor's rate (48 kHz
for the released checkpoints). Clips longer than the extractor's `max_length_s` (10 s) are
cropped (unfused models) or fused (fused models) at random positions by transformers; the
scorer draws those positions from a fixed seed and restores numpy's global RNG afterwards, so
the same clip always gets the same score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmalign.errors import DataError
from mmalign.scoring.base import Scorer, cosine, features, require_path, resolve_dtype, unique_texts


def load_audio(value: Any, sampling_rate: int, where: str) -> np.ndarray:
    """Mono float32 waveform at `sampling_rate` from a file path or a `(waveform, rate)` pair
    (waveform (T,) or (T, C)); resampled with soxr when the rates differ."""
    if isinstance(value, (str, Path)):
        import soundfile

        try:
            wave, rate = soundfile.read(str(value), dtype="float32", always_2d=True)
        except (OSError, RuntimeError) as e:  # soundfile.LibsndfileError is a RuntimeError
            raise DataError(f"{where}: unreadable audio {value} ({e})") from e
    elif isinstance(value, tuple) and len(value) == 2:
        wave, rate = np.asarray(value[0], dtype=np.float32), int(value[1])
    else:
        raise DataError(f"{where}: expected an audio path or (waveform, sampling_rate), got {type(value).__name__}")
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if rate != sampling_rate:
        import soxr

        wave = soxr.resample(wave, rate, sampling_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


class ClapScorer(Scorer):
    """cos(text, audio) of a CLAP model folder (laion/clap-htsat-unfused, laion/larger_clap_*)."""

    kinds = ("audio",)

    def __init__(self, path: str, *, device: str | torch.device = "cpu", batch_size: int = 16,
                 dtype: str | None = None, seed: int = 0) -> None:
        from transformers import ClapModel, ClapProcessor

        super().__init__(device=device, batch_size=batch_size)
        self.dtype = resolve_dtype(dtype)
        folder = require_path(path, "CLAP model folder")
        self.processor = ClapProcessor.from_pretrained(folder, local_files_only=True)
        self.model = ClapModel.from_pretrained(folder, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        self.sampling_rate = self.processor.feature_extractor.sampling_rate
        fused = bool(getattr(self.model.config.audio_config, "enable_fusion", False))
        self.truncation = "fusion" if fused else "rand_trunc"
        self.seed = seed
        # RoBERTa positions start after the padding index: 514 positions hold 512 tokens
        self.max_text_length = self.model.config.text_config.max_position_embeddings - 2

    def _audio_inputs(self, waves: list[np.ndarray]) -> dict[str, Tensor]:
        state = np.random.get_state()  # the extractor crops with numpy's global RNG
        np.random.seed(self.seed)
        try:
            inputs = self.processor(audio=waves, sampling_rate=self.sampling_rate, truncation=self.truncation,
                                    padding="repeatpad", return_tensors="pt")
        finally:
            np.random.set_state(state)
        return inputs

    @torch.no_grad()
    def embeddings(self, conditions: list[str], outputs: list[Any]) -> tuple[Tensor, Tensor]:
        """(N, D) text and (N, D) audio embeddings."""
        waves = [load_audio(o, self.sampling_rate, f"clap, output {i}") for i, o in enumerate(outputs)]
        audio = self._audio_inputs(waves)
        audio_emb = features(self.model.get_audio_features(
            input_features=audio["input_features"].to(self.device, self.dtype),
            is_longer=audio.get("is_longer", torch.zeros(len(waves), 1, dtype=torch.bool)).to(self.device)))
        texts, index = unique_texts(conditions)
        tokens = self.processor(text=texts, padding=True, truncation=True, max_length=self.max_text_length,
                                return_tensors="pt")
        text_emb = features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                         attention_mask=tokens["attention_mask"].to(self.device)))
        return text_emb[index.to(self.device)], audio_emb

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        return cosine(*self.embeddings(conditions, outputs))
