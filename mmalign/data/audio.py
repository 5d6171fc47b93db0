"""Audio for the audio diffusion modalities: reading clips, the AudioLDM log-mel, Audio-Alpaca.

No torchaudio (METHODS.md §2: the registry's torchaudio is built for another torch):
`soundfile` decodes (wav, flac, ogg, ...), `soxr` resamples, `torch.stft` + a Slaney mel
filter bank (transformers' `mel_filter_bank`, which matches librosa's `filters.mel`) make the mel.

The mel is AudioLDM's (Liu et al. 2023; AudioLDM, AudioLDM2 and Tango share it), from their
`TacotronSTFT(filter_length=1024, hop_length=160, win_length=1024, n_mel_channels=64,
sampling_rate=16000, mel_fmin=0, mel_fmax=8000)`:

    wave  = (x - mean x) / (max |x - mean x| + 1e-8) · 0.5        (their `normalize_wav`)
    |S|   = |STFT(wave)|: periodic Hann 1024, hop 160, the signal reflect-padded by 512 each side
            (their conv STFT; = torch.stft center=True, pad_mode="reflect"), MAGNITUDE not power
    mel   = log(clamp(M · |S|, min=1e-5))                            (dynamic_range_compression, C=1)

with M the 64 × 513 Slaney mel bank (librosa defaults: htk=False, norm="slaney") from 0 to
8000 Hz; a 10.24 s clip gives 1 + 163840 / 160 = 1025 frames, cropped to 1024 (their
`target_length`). diffusers' AudioLDM2Pipeline (pipeline_audioldm2.py) only decodes: its
vocoder `SpeechT5HifiGan` takes these (T, 64) mels (`model_in_dim` 64, `sampling_rate` 16000,
upsample rates multiplying to the hop, 160), so the constants are read off the vocoder config
when the folder has one.

Audio-Alpaca (declare-lab/audio-alpaca, Tango 2): parquet rows `prompt, chosen, rejected,
strategy`, the audio columns as Hugging Face `Audio` features ({"bytes", "path"} structs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from mmalign.data.media import _resolve
from mmalign.data.preference import read_records, validate_records
from mmalign.errors import DataError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


# -- reading clips ------------------------------------------------------------------------------
Roots = str | Path | Sequence[str | Path] | None


def read_waveform(value: Any, where: str, root: Roots = None) -> tuple[np.ndarray, int]:
    """(waveform (T, C) float32, sample rate) from a record field: a file path (relative paths
    against `root`, the data folders), raw bytes, {"bytes", "path"} (HF `Audio` storage),
    {"array", "sampling_rate"} (HF `Audio` decoded) or a (waveform, rate) pair. An unreadable
    clip raises a `DataError` naming `where`."""
    import soundfile

    if isinstance(value, tuple) and len(value) == 2:
        return _as_2d(np.asarray(value[0], dtype=np.float32)), int(value[1])
    if isinstance(value, dict) and "array" in value:
        return _as_2d(np.asarray(value["array"], dtype=np.float32)), int(value["sampling_rate"])
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, (bytes, bytearray)):
            wave, rate = soundfile.read(io.BytesIO(value), dtype="float32", always_2d=True)
        elif isinstance(value, (str, Path)):
            wave, rate = soundfile.read(str(_resolve(Path(value), root)), dtype="float32", always_2d=True)
        else:
            raise DataError(f"{where}: expected an audio path, bytes, {{'bytes','path'}} or "
                            f"{{'array','sampling_rate'}}, got {type(value).__name__}")
    except (OSError, RuntimeError, ValueError) as e:  # soundfile.LibsndfileError is a RuntimeError
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: unreadable audio ({e})") from e
    return wave, int(rate)


def _as_2d(wave: np.ndarray) -> np.ndarray:
    return wave[:, None] if wave.ndim == 1 else wave


def load_audio(value: Any, where: str, root: Roots = None, *,
               sample_rate: int, channels: int = 1, min_seconds: float = 0.0,
               max_seconds: float | None = None, pad: bool = True) -> Tensor:
    """(channels, T) float32 waveform at `sample_rate`.

    Multi-channel clips are averaged to mono (channels=1); a mono clip is repeated for channels=2;
    other rates are resampled with soxr (high quality). A clip shorter than `min_seconds` is a
    `DataError`; longer than `max_seconds` is cropped from the start; shorter is zero-padded at
    the end to exactly `max_seconds` when `pad` (so a batch stacks)."""
    import soxr

    wave, rate = read_waveform(value, where, root)
    if wave.shape[0] == 0 or not np.isfinite(wave).all():
        raise DataError(f"{where}: empty or non-finite audio")
    if channels == 1:
        wave = wave.mean(axis=1, keepdims=True)
    elif wave.shape[1] == 1:
        wave = np.repeat(wave, channels, axis=1)
    elif wave.shape[1] != channels:
        raise DataError(f"{where}: {wave.shape[1]} channels cannot become {channels}")
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ")
    seconds = wave.shape[0] / sample_rate
    if seconds < min_seconds:
        raise DataError(f"{where}: clip is {seconds:.3f} s, shorter than min_seconds {min_seconds:g}")
    out = torch.from_numpy(np.ascontiguousarray(wave.T, dtype=np.float32))
    if max_seconds is not None:
        length = int(round(max_seconds * sample_rate))
        out = out[:, :length]
        if pad and out.shape[1] < length:
            out = torch.nn.functional.pad(out, (0, length - out.shape[1]))
    return out


def normalize_waveform(wave: Tensor) -> Tensor:
    """AudioLDM / Tango `normalize_wav` per row of (N, T): zero mean, peak 0.5."""
    wave = wave - wave.mean(dim=-1, keepdim=True)
    return 0.5 * wave / (wave.abs().amax(dim=-1, keepdim=True) + 1e-8)


# -- the mel ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MelSettings:
    """AudioLDM / AudioLDM2 / Tango mel constants (module docstring)."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 160
    win_length: int = 1024
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0
    clip: float = 1e-5  # log floor: silence is log(1e-5) = -11.51

    def frames(self, seconds: float) -> int:
        """Mel frames of a clip: seconds · rate / hop (10.24 s -> 1024)."""
        return int(round(seconds * self.sample_rate / self.hop_length))


def mel_filters(s: MelSettings) -> Tensor:
    """(n_mels, n_fft/2 + 1) Slaney-scale, Slaney-normalised triangular filters (= librosa's
    `filters.mel(sr, n_fft, n_mels, fmin, fmax)` defaults, which AudioLDM uses)."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(num_frequency_bins=s.n_fft // 2 + 1, num_mel_filters=s.n_mels, min_frequency=s.fmin,
                           max_frequency=s.fmax, sampling_rate=s.sample_rate, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(np.ascontiguousarray(bank.T, dtype=np.float32))


def log_mel(wave: Tensor, s: MelSettings, frames: int | None = None, filters: Tensor | None = None) -> Tensor:
    """(N, frames, n_mels) log-mel of (N, T) waveforms at `s.sample_rate` (module docstring; no
    normalisation here: see `normalize_waveform`). frames: crop (or pad with the silence value
    log(clip)) to this many frames; None keeps 1 + T // hop."""
    window = torch.hann_window(s.win_length, periodic=True, device=wave.device)
    spec = torch.stft(wave.float(), s.n_fft, hop_length=s.hop_length, win_length=s.win_length, window=window,
                      center=True, pad_mode="reflect", return_complex=True).abs()  # (N, F, frames)
    bank = (mel_filters(s) if filters is None else filters).to(wave.device)
    mel = torch.log(torch.clamp(bank @ spec, min=s.clip)).transpose(1, 2)  # (N, frames, n_mels)
    if frames is not None:
        mel = mel[:, :frames]
        if mel.shape[1] < frames:
            mel = torch.nn.functional.pad(mel, (0, 0, 0, frames - mel.shape[1]), value=float(np.log(s.clip)))
    return mel


# -- Audio-Alpaca and generic audio pairs --------------------------------------------------------
def _audio_ok(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value.get("bytes")) or bool(value.get("path")) or value.get("array") is not None
    if isinstance(value, (bytes, bytearray)):
        return len(value) > 0
    return isinstance(value, str) and bool(value.strip())


def audio_pair_records(rows: list[dict[str, Any]], source: str, keep: Sequence[str] = ()) -> list[dict[str, Any]]:
    """{"prompt", "chosen", "rejected"} records (+ the `keep` columns present) from rows whose
    chosen / rejected are audio; a row without usable audio or prompt is a DataError naming it."""
    records = []
    for i, row in enumerate(rows):
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in row]
        if missing:
            raise DataError(f"{source}: row {i} has no column {', '.join(map(repr, missing))}")
        if not all(_audio_ok(row[c]) for c in ("chosen", "rejected")):
            raise DataError(f"{source}: row {i} has an empty chosen or rejected audio")
        record = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        record.update({k: row[k] for k in keep if k in row})
        records.append(record)
    validate_records(records, source, "pair")
    return records


def load_audio_alpaca(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """Audio-Alpaca (`data.format: audio_alpaca`): a parquet file, a folder of parquet shards or a
    `datasets` folder with `prompt, chosen, rejected, strategy` (audio as {"bytes", "path"});
    audio paths inside a shard are relative to its folder. Returns (pair records, "pair")."""
    path = Path(path)
    if path.is_dir() and not (path / "dataset_info.json").is_file():
        shards = sorted(path.glob("*.parquet")) or sorted(path.glob("*/*.parquet"))
        if not shards:
            raise DataError(f"{path}: no .parquet shards (Audio-Alpaca) inside")
    else:
        shards = [path]
    records = []
    for shard in shards:
        rows = read_records(shard)
        folder = shard.parent if shard.is_file() else shard
        for r in rows:  # relative audio paths without bytes: against the shard's folder
            for c in ("chosen", "rejected"):
                v = r.get(c)
                if isinstance(v, dict) and not v.get("bytes") and v.get("path") and not Path(v["path"]).is_absolute():
                    r[c] = str(folder / v["path"])
        records += audio_pair_records(rows, str(shard), keep=("strategy", "reward_chosen", "reward_rejected"))
    return records, "pair"


def load_audio_pairs(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """Generic audio pairs (`data.format: audio_pairs`): jsonl / json / parquet rows
    {"prompt", "chosen", "rejected"} with audio as paths relative to the file, bytes,
    {"bytes", "path"} or {"array", "sampling_rate"}; other columns (weight, ...) kept."""
    rows = read_records(path)
    keep = sorted({k for r in rows for k in r} - {"prompt", "chosen", "rejected"})
    return audio_pair_records(rows, str(path), keep=keep), "pair"


# -- a picture of a clip (the HTML report) -------------------------------------------------------
def spectrogram_image(wave: Tensor, sample_rate: int, width: int = 256, height: int = 96) -> Any:
    """A `PIL.Image` (RGB, width × height) of the log-magnitude STFT of a (T,) clip: time left to
    right, frequency bottom (0 Hz) to top (rate / 2), louder brighter (dB range clipped to 80)."""
    from PIL import Image

    wave = wave.float().reshape(-1)
    n_fft = 512 if sample_rate >= 16000 else 256
    if wave.numel() < n_fft:
        wave = torch.nn.functional.pad(wave, (0, n_fft - wave.numel()))
    hop = max(wave.numel() // (2 * width), 16)
    spec = torch.stft(wave, n_fft, hop_length=hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    db = 20 * torch.log10(spec.clamp(min=1e-8))
    db = (db - db.max() + 80).clamp(min=0) / 80  # (F, frames) in [0, 1]
    level = (db.flip(0) * 255).round().to(torch.uint8).numpy()
    # a blue -> yellow ramp: quiet is dark blue, loud is bright yellow
    rgb = np.stack([level, (level.astype(np.float32) * 0.85).astype(np.uint8), 255 - level // 2], axis=-1)
    return Image.fromarray(rgb).resize((width, height), Image.BILINEAR)
