"""Audio Diffusion-DPO (Tango 2, METHODS.md §2): the parts `DiffusionLikelihood` takes for clips
(`MelLatents`, `PromptwiseText`); the families are `mmalign/families/tango.py` and `audioldm2.py`.

The clip plays the image's part: waveform -> AudioLDM log-mel (N, 1, frames, n_mels) as
`pixel_values` -> the mel-VAE's latent (N, C, frames/f, n_mels/f) -> the same draw (one t and ε
per pair), targets (ε or v from the scheduler config), mse over every non-batch dim and
logp = -0.5·mse of `DiffusionLikelihood`. Only the parts differ:

- collate reads each clip (`mmalign.data.audio.load_audio`: mono, resampled to the model's rate,
  cropped / zero-padded to `audio.seconds`), normalises it as AudioLDM and takes the log-mel;
  no crop or flip (the draw's flip/crop choices are drawn, keeping the random stream, and unused);
- the text conditioning is encoded PER PROMPT (each prompt alone, as the pipeline encodes one
  prompt at sampling time), kept in an in-memory cache keyed by the prompt (the encoders are
  frozen, so a cached value is exact), then right-padded to the batch's longest with mask 0;
  the mask reaches the UNet's cross-attention, so padding never changes a prediction;
- caption dropout uses the empty prompt "" (Tango drops captions to ""; `null_prompt: zeros`
  is refused: a zero mask would leave cross-attention nothing to attend to);
- `diffusion.random_flip` and `crop: random` are ConfigErrors (a clip is never mirrored or
  randomly cropped);
- `mmalign cache` (diffusion.cache_dir) caches per clip the mel-VAE posterior's mean and std and
  per unique prompt (and "") its conditioning with its length, which training cuts back and pads
  as here (`audio_cache.py`): the same UNet inputs as the uncached draw.

Families (registry names):
- `tango`: diffusers `UNet2DConditionModel` + a T5 / Flan-T5 encoder; conditioning = the
  encoder's last hidden state, its attention mask passed as `encoder_attention_mask` (Tango's
  `boolean_encoder_mask`). Folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/ [vocoder/].
- `audioldm2`: a diffusers AudioLDM2Pipeline folder; conditioning from the pipeline's own
  `encode_prompt` (CLAP text embedding + T5 -> AudioLDM2ProjectionModel -> GPT2's generated
  embeddings): unet(x_t, t, encoder_hidden_states=GPT2 embeds, encoder_hidden_states_1=T5,
  encoder_attention_mask_1=T5 mask), exactly as the pipeline's sampling loop calls it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from mmalign.data.audio import MelSettings, load_audio, log_mel, mel_filters, normalize_waveform
from mmalign.data.preference import flatten
from mmalign.modalities.diffusion import _output_names, sample_latents, vae_posterior
from mmalign.modalities.text import LiveEncoders, _prompt_text
from mmalign.tensors import right_pad_cat

DEFAULT_RATE, DEFAULT_MELS = 16000, 64  # AudioLDM / AudioLDM2 / Tango


def mel_settings(audio: Any, vocoder_config: dict[str, Any] | None) -> MelSettings:
    """The `audio` section completed from the vocoder config (sampling_rate, model_in_dim)."""
    voc = vocoder_config or {}
    return MelSettings(sample_rate=audio.sample_rate or int(voc.get("sampling_rate", DEFAULT_RATE)),
                       n_fft=audio.n_fft, hop_length=audio.hop_length, win_length=audio.n_fft,
                       n_mels=audio.n_mels or int(voc.get("model_in_dim", DEFAULT_MELS)), fmin=audio.fmin,
                       fmax=audio.fmax)


def pad_conditioning(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-prompt conditioning dicts of (1, L_i, ...) tensors into (n, max L, ...), right-
    padding with zeros (a padded mask position is 0: never attended)."""
    return {key: right_pad_cat([p[key] for p in parts]) for key in parts[0]}


def audio_cache_settings(cfg: Any) -> dict[str, Any]:
    """Plan settings of an audio cache: the `audio` section (what makes the mels; not
    prompt_cache), resolution and crop None (no image resize or crop)."""
    from dataclasses import asdict

    audio = {k: v for k, v in asdict(cfg.audio).items() if k != "prompt_cache"}
    return {"resolution": None, "crop": None, "audio": audio}


# -- latents: clips -> log-mels -> mel-VAE ------------------------------------------------------
class MelLatents:
    """Clips -> AudioLDM log-mels (collate) -> mel-VAE latents (draw); no flip or crop.

    vae: the frozen mel-VAE, or None when only the mel settings are wanted (a cached run);
    audio: the `audio` config section; vocoder_config: the folder's vocoder/config.json (rate and
    mel bins), if any; roots: the data folders (`data_roots`)."""

    items_key = "pixel_values"

    def __init__(self, vae: Any, settings: Any, audio: Any, vocoder_config: dict[str, Any] | None,
                 roots: Sequence[str | Path] = ()) -> None:
        from mmalign.errors import ConfigError

        self.vae = None if vae is None else vae.requires_grad_(False).eval()
        self.settings, self.audio, self.roots = settings, audio, [Path(r) for r in roots]
        self.mel = mel_settings(audio, vocoder_config)
        self.frames = self.mel.frames(audio.seconds)
        self.filters = mel_filters(self.mel)
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if self.frames % factor or self.mel.n_mels % factor:
                raise ConfigError(f"audio: {self.frames} mel frames ({audio.seconds} s) x {self.mel.n_mels} "
                                  f"mels must be divisible by the VAE factor {factor}")

    def to(self, device: torch.device | str) -> None:
        if self.vae is not None:
            self.vae.to(device)

    def waveforms(self, values: list[Any], wheres: list[str], roots: list[str | None] | None = None) -> Tensor:
        """(N, T) mono clips at the model's rate, exactly `audio.seconds` long. `roots`: each
        clip's own data folder (records' `_root`), else the data folders."""
        a = self.audio
        roots = roots or [None] * len(values)
        return torch.cat([load_audio(v, w, r or self.roots, sample_rate=self.mel.sample_rate,
                                     min_seconds=a.min_seconds, max_seconds=a.seconds)
                          for v, w, r in zip(values, wheres, roots)])

    def mels(self, wave: Tensor) -> Tensor:
        """(N, 1, frames, n_mels) AudioLDM log-mels of (N, T) waveforms."""
        if self.audio.normalize:
            wave = normalize_waveform(wave)
        return log_mel(wave, self.mel, self.frames, self.filters)[:, None]

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """pixel_values (N, 1, frames, n_mels): the log-mels of the N clips (flatten order)."""
        items = flatten(records, kind)
        wave = self.waveforms([item["response"] for item in items], _output_names(kind, records),
                              [item.get("_root") for item in items])
        return {"pixel_values": self.mels(wave)}

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, frames / f, n_mels / f), f = 2^(VAE blocks - 1)."""
        c = self.vae.config
        factor = 2 ** (len(c.block_out_channels) - 1)
        return (c.latent_channels, self.frames // factor, self.mel.n_mels // factor)

    def latent_scaling(self) -> tuple[float | None, float]:
        return getattr(self.vae.config, "shift_factor", None), float(self.vae.config.scaling_factor)

    def latent_dist(self, pixels: Tensor, batch_size: int = 0) -> tuple[Tensor, Tensor]:
        """The mel-VAE's posterior mean, std (N, C, h, w) float32 of log-mels (`vae_posterior`)."""
        return vae_posterior(self.vae, pixels, batch_size or self.settings.vae_batch_size)

    def sample(self, inputs: dict[str, Any], groups: Tensor, flip: Tensor, crop_fraction: Tensor,
               eta: Callable[[Sequence[int]], Tensor]) -> tuple[Tensor, Tensor]:
        """x0 = mean + std · η of the mels as they are (no flip or crop: a time-reversed clip is
        another sound; the group's flip and crop choices are drawn and unused) and crop top-left
        (N, 2) zeros."""
        pixels = inputs["pixel_values"]
        mean, std = self.latent_dist(pixels)
        crop_top_left = torch.zeros(pixels.shape[0], 2, dtype=torch.long)
        return sample_latents(mean, std, eta(mean.shape), *self.latent_scaling()), crop_top_left

    # -- what `mmalign cache` stores (cache_writer.py, audio_cache.py) ---------------------------
    def cache_settings(self, cfg: Any) -> dict[str, Any]:
        return audio_cache_settings(cfg)

    def cache_item(self, value: Any, where: str, fraction: Tensor | None,
                   root: str | None = None) -> tuple[Tensor, list[int]]:
        """What the VAE encodes for one clip: its log-mel (1, frames, n_mels) exactly as `collate`
        makes it (no crop, no flip), and the facts [frames, n_mels, 0, 0, 0, 0] (no crop offsets)."""
        mel = self.mels(self.waveforms([value], [where], [root]))[0]
        return mel, [self.frames, self.mel.n_mels, 0, 0, 0, 0]


# -- conditioning: each prompt encoded alone ----------------------------------------------------
class PromptwiseEncoder(Protocol):
    """A family's per-prompt text encoding (tango's T5, AudioLDM2's pipeline `encode_prompt`)."""

    text_encoders: list[Any]
    tokenizers: list[Any]

    def encode_one(self, prompt: str) -> dict[str, Tensor]:
        """The conditioning tensors (1, L, ...) of one prompt, unpadded, with its mask (long)."""
        ...


class PromptwiseText(LiveEncoders):
    """Live audio conditioning: each group's prompt ("" where dropped) encoded ALONE, as the pipeline
    encodes one prompt at sampling time, kept in an LRU keyed by the prompt (frozen encoders: a
    kept value is exact), right-padded per batch with mask 0 (`pad_conditioning`)."""

    def __init__(self, encoder: PromptwiseEncoder, cache_size: int) -> None:
        super().__init__(encoder)
        self.cache_size = max(cache_size, 1)
        self.prompt_cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        """prompts: the N prompt texts (encoded in the draw)."""
        return {"prompts": [_prompt_text(item["prompt"]) for item in flatten(records, kind)]}

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Conditioning (n, L, ...) of plain strings, from the per-prompt LRU."""
        parts = []
        for prompt in prompts:
            if prompt not in self.prompt_cache:
                self.prompt_cache[prompt] = self.encoder.encode_one(prompt)
                if len(self.prompt_cache) > self.cache_size:
                    self.prompt_cache.popitem(last=False)
            parts.append(self.prompt_cache[prompt])
        return pad_conditioning(parts)

    def per_item(self, inputs: dict[str, Any], groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        """Each group's prompt (its first item's), "" where dropped (G,); per-item (N, ...) tensors."""
        order = groups.tolist()
        prompts = ["" if bool(dropped[g]) else inputs["prompts"][order.index(g)] for g in range(len(dropped))]
        cond = self.encode_text(prompts)
        return {k: v[groups.to(v.device)] for k, v in cond.items()}

    def cache_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Each prompt encoded alone (as the draw encodes it), right-padded to the longest of
        `prompts`: tensors (n, L, ...), and `length/<name>` (n,) long, each prompt's own length of
        every padded tensor (the reader cuts it back)."""
        parts = [self.encoder.encode_one(p) for p in prompts]
        out = pad_conditioning(parts)
        for key, value in parts[0].items():
            if value.ndim >= 2:
                out[f"length/{key}"] = torch.tensor([p[key].shape[1] for p in parts], dtype=torch.long)
        return out


# -- loading ----------------------------------------------------------------------------------
def vocoder_config(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / "vocoder" / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def check_audio_config(cfg: Any) -> None:
    """Settings that have no meaning for clips are ConfigErrors."""
    from mmalign.errors import ConfigError

    if cfg.diffusion.random_flip:
        raise ConfigError("diffusion.random_flip: audio clips are never flipped (a time-reversed clip is another "
                          "sound); set it to false")
    if cfg.diffusion.crop != "center":
        raise ConfigError(f"diffusion.crop: {cfg.diffusion.crop!r}: audio clips are not cropped at random (each clip "
                          "is read from its start for audio.seconds); set it to center")
    if cfg.train.validate_every:
        raise ConfigError("train.validate_every: no validation samples for audio models yet; set it to 0")


def load_language_model(path: str | Path, dtype: torch.dtype) -> Any:
    """AudioLDM2's GPT2 as GPT2LMHeadModel even when the folder names GPT2Model (cvssp/audioldm2):
    the pipeline's generation loop needs GenerationMixin methods that GPT2Model lacks in recent
    transformers (diffusers issue #12630); the base weights load unchanged, hidden states equal."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path, subfolder="language_model", dtype=dtype)
