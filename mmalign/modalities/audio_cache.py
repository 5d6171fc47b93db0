"""Audio Diffusion-DPO (`tango`, `audioldm2`) from the latent cache (`mmalign cache CONFIG`).

The writer (`cache_writer.py`) and the reader (`diffusion_cache.LatentCache`, `CachedLatents`)
are the image families'; the audio parts supply what differs (`MelLatents.cache_item`,
`cache_settings`, `PromptwiseText.cache_text` in audio.py; `CachedPromptwiseText` here). What is
cached:

- per clip: the mel-VAE posterior's mean and std (C, frames/f, n_mels/f) of the clip's log-mel,
  made exactly as the uncached `collate` makes it (read, mono, resampled, cropped / padded to
  `audio.seconds` from the start, normalised, AudioLDM log-mel). NO flips and NO crops: a
  time-reversed clip is another sound and the clip is never cropped at random, so
  `diffusion.random_flip` and `crop: random` are ConfigErrors for audio, cached or not;
- per unique prompt, and for the null prompt "" (caption dropout): every conditioning tensor
  the UNet call consumes, each prompt encoded ALONE as the uncached draw encodes it (tango: the
  T5 last hidden state `encoder_hidden_states` + `encoder_attention_mask`; audioldm2: the
  pipeline's `encode_prompt`: GPT2 `encoder_hidden_states`, T5 `encoder_hidden_states_1` +
  `encoder_attention_mask_1`). Masks are stored as int64 (never in the cache dtype); a text
  shard is padded to its longest prompt and stores `length/<name>`, each prompt's own length;
- the plan's settings hold the `audio` section (a cache of other mels is refused), resolution
  and crop are None.

Same UNet inputs as uncached: the uncached draw right-pads each group's conditioning (its
prompt's, or ""'s where dropped) to the longest of the batch with zeros (mask 0). The cached
draw cuts every item's cached tensors back to its own length, takes the null prompt's where
the group's caption is dropped, and pads with the same `pad_conditioning`: bit-identical inputs
in float32 (`diffusion.cache_dtype: float32`). The draw's random choices (flip and crop fraction
drawn and unused, dropout, t, ε, then the latent sample η per clip) are `DiffusionLikelihood.draw`'s,
i.e. the uncached ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family
from mmalign.modalities.audio import audio_cache_settings, pad_conditioning
from mmalign.modalities.diffusion import DiffusionLikelihood, ElboObjective
from mmalign.modalities.diffusion_cache import CachedLatents, CachedText, open_cache
from mmalign.modalities.loading import denoiser_config, load_parts

LENGTH = "length/"


def cut_to_lengths(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """One prompt's conditioning {name: (1, L_stored, ...), "length/<name>": (1,)} -> {name:
    (1, L, ...)} cut to its own length L (tensors without a length unchanged)."""
    out = {}
    for name, value in tensors.items():
        if name.startswith(LENGTH):
            continue
        length = tensors.get(LENGTH + name)
        out[name] = value if length is None else value[:, : int(length.reshape(-1)[0])]
    return out


class CachedPromptwiseText(CachedText):
    """Audio conditioning from the cache: collate as `CachedText` (each item's caption tensors);
    per item, the caption's tensors cut to its own length, the null prompt's where its group's
    caption is dropped, right-padded with zeros to the longest (`pad_conditioning`), as the live
    `PromptwiseText`."""

    def __init__(self, cache: Any) -> None:
        super().__init__(cache, "empty")

    def per_item(self, inputs: dict[str, Any], groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        names = [k for k in inputs if k.startswith("prompt/")]
        device = inputs[names[0]].device
        null = cut_to_lengths({k: v.to(device) for k, v in self.cache.null.items()})
        rows = []
        for item, is_dropped in enumerate(dropped[groups].tolist()):
            if is_dropped:
                rows.append(null)
            else:
                rows.append(cut_to_lengths({k[len("prompt/"):]: inputs[k][item : item + 1] for k in names}))
        return pad_conditioning(rows)


def build_cached_audio(cfg: Any, family: Family, denoiser: Any, trained: bool = True) -> tuple[Any, DiffusionLikelihood, None]:
    """(UNet, audio likelihood reading `diffusion.cache_dir`, None): only the UNet and the scheduler
    are loaded; clips' latent distributions and prompts' conditioning from the cache."""
    parts = load_parts(cfg, family, unet=trained, frozen=False)
    channels = denoiser.latent_channels(denoiser_config(cfg, family))
    cache = open_cache(cfg, family, channels, audio_cache_settings(cfg))
    d = cfg.diffusion
    likelihood = DiffusionLikelihood(family, ElboObjective(parts["scheduler"], d.prediction_type),
                                     CachedLatents(cache, d), CachedPromptwiseText(cache), denoiser, d)
    return parts["unet"], likelihood, None
