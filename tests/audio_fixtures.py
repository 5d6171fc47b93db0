"""Test data for the audio modalities: tiny pipelines (`mmalign.toyaudio`, saved to disk and
loaded back through `build(cfg)`) and clip pairs written as WAV files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmalign.toyaudio import SAMPLE_RATE, save_tiny_audioldm2, save_tiny_clap, save_tiny_tango  # noqa: F401

PROMPTS = ["a dog barks", "rain on a roof", "a bell rings, then a car passes", "birds sing and wind blows"]


def tone(freq: float, seconds: float, rate: int = SAMPLE_RATE, channels: int = 1, amplitude: float = 0.3) -> np.ndarray:
    """(T, channels) float32 sine at `freq` Hz."""
    t = np.arange(int(round(seconds * rate))) / rate
    wave = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def write_wav(path: Path, wave: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave, rate)
    return path


def write_audio_pairs(root: Path, count: int, seconds: float = 0.32) -> tuple[Path, list[dict]]:
    """`count` pairs of tones (chosen 440·k Hz, rejected 1000 + 300·k Hz) in root/audio and their
    jsonl root/train.jsonl (paths relative to it). Returns (path, records)."""
    records = []
    for i in range(count):
        chosen = write_wav(root / "audio" / f"{i}_c.wav", tone(220 * (i % 4 + 1), seconds))
        rejected = write_wav(root / "audio" / f"{i}_r.wav", tone(1000 + 300 * (i % 4), seconds))
        records.append({"prompt": PROMPTS[i % len(PROMPTS)], "chosen": str(chosen.relative_to(root)),
                        "rejected": str(rejected.relative_to(root))})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def build_for(pipeline: Path, data: Path, modality: str, audio: dict | None = None, data_format: str = "auto",
              **diffusion):
    """(model, likelihood, processor) of a tiny audio pipeline: 0.32 s clips, no caption dropout."""
    from mmalign.config import Config, from_dict
    from mmalign.modalities import build_modality

    cfg = from_dict(Config, {"modality": modality, "model": {"path": str(pipeline)},
                             "data": {"train": str(data), "format": data_format},
                             "diffusion": dict({"caption_dropout": 0.0}, **diffusion),
                             "audio": dict({"seconds": 0.32}, **(audio or {}))})
    return build_modality(cfg)


def write_tiny_audio_run(root: Path, count: int = 8) -> Path:
    """A tiny AudioLDM2 pipeline in root/pipeline, a tiny CLAP in root/clap and `count` tone pairs
    in root/pairs/train.jsonl (what configs/tiny/audio_dpo.yaml reads)."""
    save_tiny_audioldm2(root / "pipeline")
    save_tiny_clap(root / "clap")
    return write_audio_pairs(root / "pairs", count)[0]


if __name__ == "__main__":  # python tests/audio_fixtures.py runs/tiny_audio
    import sys

    write_tiny_audio_run(Path(sys.argv[1]))
    print(f"wrote {sys.argv[1]}/pipeline, {sys.argv[1]}/clap and {sys.argv[1]}/pairs/train.jsonl")
