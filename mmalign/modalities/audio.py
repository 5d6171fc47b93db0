"""Audio Diffusion-DPO (Tango 2, METHODS.md §2) on the shared ELBO of `diffusion.py`.

The clip plays the image's part: waveform -> AudioLDM log-mel (N, 1, frames, n_mels) as
`pixel_values` -> the mel-VAE's latent (N, C, frames/f, n_mels/f) -> the same draw (one t and ε
per pair), targets (ε or v from the scheduler config), mse over every non-batch dim and
logp = -0.5·mse as `DiffusionLikelihood`. Only the inputs differ:

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
from typing import Any, Sequence

import torch
from torch import Tensor

from mmalign.data.audio import MelSettings, load_audio, log_mel, mel_filters, normalize_waveform
from mmalign.data.preference import batch_fields, flatten
from mmalign.modalities.diffusion import (DiffusionLikelihood, PipelineLayout, _output_names, _prompt_text,
                                          data_roots, load_parts)
from mmalign.types import Draw, PreferenceBatch

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
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if values[0].ndim >= 2:
            length = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, length - v.shape[1])) for v in values]
        out[key] = torch.cat(values)
    return out


class AudioLikelihood(DiffusionLikelihood):
    """Tango-style audio likelihood: UNet2DConditionModel conditioned on a T5 encoder's last hidden
    state with its attention mask. `audio`: the `AudioConfig` section; `vocoder_config`: the
    folder's vocoder/config.json (rate and mel bins), if any."""

    def __init__(self, vae: Any, text_encoders: Sequence[Any], tokenizers: Sequence[Any], scheduler: Any,
                 settings: Any, roots: Sequence[str | Path] = (), audio: Any = None,
                 vocoder_config: dict[str, Any] | None = None) -> None:
        from mmalign.config import AudioConfig, ConfigError

        super().__init__(vae, text_encoders, tokenizers, scheduler, settings, roots)
        if settings.null_prompt != "empty":
            raise ConfigError("diffusion.null_prompt: audio models drop captions to the empty prompt \"\" "
                              "(Tango); 'zeros' is not supported")
        self.audio = audio or AudioConfig()
        self.mel = mel_settings(self.audio, vocoder_config)
        self.frames = self.mel.frames(self.audio.seconds)
        self.filters = mel_filters(self.mel)
        self.prompt_cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if self.frames % factor or self.mel.n_mels % factor:
                raise ConfigError(f"audio: {self.frames} mel frames ({self.audio.seconds} s) x {self.mel.n_mels} "
                                  f"mels must be divisible by the VAE factor {factor}")

    # -- collate: clips -> log-mels ----------------------------------------------------------
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

    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        """records -> N clips (2B for pairs: chosen rows first). inputs: pixel_values (N, 1, frames,
        n_mels) log-mels; prompts: the N prompt texts (encoded in the draw, cached per prompt)."""
        items = flatten(records, kind)
        wave = self.waveforms([item["response"] for item in items], _output_names(kind, records),
                              [item.get("_root") for item in items])
        inputs = {"pixel_values": self.mels(wave), "prompts": [_prompt_text(item["prompt"]) for item in items]}
        return batch_fields(records, kind, inputs)

    # -- draw ---------------------------------------------------------------------------------
    def augment(self, batch: PreferenceBatch, flip: Tensor, crop_fraction: Tensor) -> tuple[Tensor, Tensor]:
        """No flip or crop for spectrograms (time-reversed audio is another sound): the mels as
        they are, crop top-left (N, 2) zeros."""
        pixels = batch.inputs["pixel_values"]
        return pixels, torch.zeros(pixels.shape[0], 2, dtype=torch.long)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, frames / f, n_mels / f), f = 2^(VAE blocks - 1)."""
        c = self.vae.config
        factor = 2 ** (len(c.block_out_channels) - 1)
        return (c.latent_channels, self.frames // factor, self.mel.n_mels // factor)

    def prompt_conditioning(self, batch: PreferenceBatch, groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        """Each group's prompt (its first item's), "" where dropped (G,); per-item (N, ...) tensors."""
        order = groups.tolist()
        prompts = ["" if bool(dropped[g]) else batch.inputs["prompts"][order.index(g)] for g in range(len(dropped))]
        cond = self.encode_text(prompts)
        return {k: v[groups.to(v.device)] for k, v in cond.items()}

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Conditioning of plain strings (n, L, ...), from the per-prompt cache (`encode_one`)."""
        parts = []
        for prompt in prompts:
            if prompt not in self.prompt_cache:
                self.prompt_cache[prompt] = self.encode_one(prompt)
                if len(self.prompt_cache) > max(self.audio.prompt_cache, 1):
                    self.prompt_cache.popitem(last=False)
            parts.append(self.prompt_cache[prompt])
        return pad_conditioning(parts)

    @torch.no_grad()
    def encode_one(self, prompt: str) -> dict[str, Tensor]:
        """{"encoder_hidden_states": (1, L, D) float32, "encoder_attention_mask": (1, L) long}: the
        T5 encoder's last hidden state of one prompt (no padding) and its mask."""
        encoder, tokenizer = self.text_encoders[0], self.tokenizers[0]
        tokens = tokenizer([prompt], truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
        ids, mask = tokens.input_ids.to(encoder.device), tokens.attention_mask.to(encoder.device)
        with torch.autocast(ids.device.type, enabled=False):
            hidden = encoder(input_ids=ids, attention_mask=mask)[0].float()
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    # -- hooks of the latent cache (`mmalign cache`; cache_writer.py, audio_cache.py) ----------
    @classmethod
    def cache_settings(cls, cfg: Any) -> dict[str, Any]:
        """Plan settings of an audio cache: the `audio` section (what makes the mels; not
        prompt_cache), resolution and crop None (no image resize or crop)."""
        from dataclasses import asdict

        audio = {k: v for k, v in asdict(cfg.audio).items() if k != "prompt_cache"}
        return {"resolution": None, "crop": None, "audio": audio}

    def cache_pixels(self, value: Any, where: str, root: str | None = None) -> tuple[Tensor, list[int]]:
        """What the VAE encodes for one clip: its log-mel (1, frames, n_mels) exactly as `collate`
        makes it (no crop, no flip), and the facts [frames, n_mels, 0, 0, 0, 0] (no crop offsets)."""
        mel = self.mels(self.waveforms([value], [where], [root]))[0]
        return mel, [self.frames, self.mel.n_mels, 0, 0, 0, 0]

    def cache_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Each prompt encoded alone (`encode_one`, as the draw encodes it), right-padded to the
        longest of `prompts` (`pad_conditioning`): tensors (n, L, ...), and `length/<name>` (n,)
        long, each prompt's own length of every padded tensor (the reader cuts it back)."""
        parts = [self.encode_one(p) for p in prompts]
        out = pad_conditioning(parts)
        for key, value in parts[0].items():
            if value.ndim >= 2:
                out[f"length/{key}"] = torch.tensor([p[key].shape[1] for p in parts], dtype=torch.long)
        return out

    # -- logps --------------------------------------------------------------------------------
    def unet_kwargs(self, draw: Draw, dtype: torch.dtype) -> dict[str, Any]:
        v = draw.values
        return {"encoder_hidden_states": v["encoder_hidden_states"].to(dtype),
                "encoder_attention_mask": v["encoder_attention_mask"]}

    def validate(self, model: torch.nn.Module, step: int, folder: str | Path) -> dict[str, float]:
        from mmalign.config import ConfigError

        raise ConfigError("train.validate_every: validation samples are images only; audio models have none yet")


class AudioLDM2Likelihood(AudioLikelihood):
    """AudioLDM2: conditioning from the pipeline's own `encode_prompt` (module docstring).
    text_encoders: [ClapModel, T5EncoderModel, AudioLDM2ProjectionModel, GPT2 language model]."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from diffusers import AudioLDM2Pipeline

        clap, t5, projection, language_model = self.text_encoders
        self.text_pipe = AudioLDM2Pipeline(vae=None, text_encoder=clap, text_encoder_2=t5, projection_model=projection,
                                           language_model=language_model, tokenizer=self.tokenizers[0],
                                           tokenizer_2=self.tokenizers[1], feature_extractor=None, unet=None,
                                           scheduler=None, vocoder=None)

    @torch.no_grad()
    def encode_one(self, prompt: str) -> dict[str, Tensor]:
        """{"encoder_hidden_states": (1, max_new_tokens, D_gpt2) GPT2 generated embeds,
        "encoder_hidden_states_1": (1, L, D_t5), "encoder_attention_mask_1": (1, L)} float32 / long."""
        device = self.text_encoders[1].device
        with torch.autocast(device.type, enabled=False):
            t5, mask, generated = self.text_pipe.encode_prompt([prompt], device, 1, False)
        return {"encoder_hidden_states": generated.float(), "encoder_hidden_states_1": t5.float(),
                "encoder_attention_mask_1": mask}

    def unet_kwargs(self, draw: Draw, dtype: torch.dtype) -> dict[str, Any]:
        """The pipeline's UNet call; an all-ones T5 mask (no padding in the batch) is left out,
        which changes nothing."""
        v, mask = draw.values, draw.values["encoder_attention_mask_1"]
        return {"encoder_hidden_states": v["encoder_hidden_states"].to(dtype),
                "encoder_hidden_states_1": v["encoder_hidden_states_1"].to(dtype),
                "encoder_attention_mask_1": None if bool(mask.all()) else mask}

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw) -> Any:
        """As `DiffusionLikelihood.logps`. diffusers 0.42's AudioLDM2 UNet passes the encoder mask
        into the SELF-attention mask slot when gradient checkpointing is on (positional arguments
        shifted in modeling_audioldm2.py), so a padded batch is refused there instead of being
        computed wrongly: use batch_size 1 or prompts of one length, or checkpointing off."""
        unet = getattr(model, "module", model)
        if getattr(unet, "is_gradient_checkpointing", False) and not bool(draw.values["encoder_attention_mask_1"].all()):
            from mmalign.config import ConfigError

            raise ConfigError("model.gradient_checkpointing with AudioLDM2: diffusers misroutes the text mask of a "
                              "padded batch under checkpointing; set train.batch_size 1 or gradient_checkpointing "
                              "false")
        return super().logps(model, batch, draw)


# -- loading a local folder ---------------------------------------------------------------------
def _vocoder_config(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / "vocoder" / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _check(cfg: Any) -> None:
    from mmalign.config import ConfigError

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


def build_tango(cfg: Any, use_cache: bool = True, unet: bool = True) -> tuple[Any, AudioLikelihood, None]:
    """Tango-style folder (modality `tango`): (trainable UNet, likelihood owning mel-VAE + T5, None)."""
    from transformers import T5EncoderModel

    _check(cfg)
    if use_cache and cfg.diffusion.cache_dir:
        from mmalign.modalities.audio_cache import build_cached_audio

        return build_cached_audio(cfg, AudioLikelihood, unet)
    parts = load_parts(cfg, [("text_encoder", "tokenizer", T5EncoderModel)], unet=unet)
    likelihood = AudioLikelihood(parts["vae"], parts["text_encoders"], parts["tokenizers"], parts["scheduler"],
                                 cfg.diffusion, data_roots(cfg), audio=cfg.audio,
                                 vocoder_config=_vocoder_config(cfg.model.path))
    return parts["unet"], likelihood, None


AUDIOLDM2_LAYOUT = PipelineLayout(denoiser_class="AudioLDM2UNet2DConditionModel", kind="AudioLDM2 pipeline")


def build(cfg: Any, use_cache: bool = True, unet: bool = True) -> tuple[Any, AudioLDM2Likelihood, None]:
    """AudioLDM2 pipeline folder (modality `audioldm2`): (trainable AudioLDM2 UNet, likelihood owning
    the mel-VAE, CLAP, T5, projection model and GPT2, None)."""
    from diffusers import AudioLDM2ProjectionModel
    from transformers import ClapModel, T5EncoderModel

    from mmalign.config import resolve_path

    _check(cfg)
    if use_cache and cfg.diffusion.cache_dir:
        from mmalign.modalities.audio_cache import build_cached_audio

        return build_cached_audio(cfg, AudioLDM2Likelihood, unet, AUDIOLDM2_LAYOUT)
    encoders = [("text_encoder", "tokenizer", ClapModel), ("text_encoder_2", "tokenizer_2", T5EncoderModel)]
    parts = load_parts(cfg, encoders, unet=unet, layout=AUDIOLDM2_LAYOUT)
    path, dtype = resolve_path(cfg.model.path), getattr(torch, cfg.model.dtype)
    projection = AudioLDM2ProjectionModel.from_pretrained(path, subfolder="projection_model", torch_dtype=dtype)
    encoders = [*parts["text_encoders"], projection, load_language_model(path, dtype)]
    likelihood = AudioLDM2Likelihood(parts["vae"], encoders, parts["tokenizers"], parts["scheduler"], cfg.diffusion,
                                     data_roots(cfg), audio=cfg.audio, vocoder_config=_vocoder_config(path))
    return parts["unet"], likelihood, None
