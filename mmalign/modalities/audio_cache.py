"""Audio Diffusion-DPO (`tango`, `audioldm2`) from the latent cache (`mmalign cache CONFIG`).

The writer (`cache_writer.py`) and the reader (`diffusion_cache.LatentCache`) are the image
families'; the audio likelihood only supplies hooks (`AudioLikelihood.cache_pixels`,
`cache_text`, `cache_settings` in audio.py). What is cached:

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
drawn and unused, dropout, t, ε, then the latent sample η per clip) are
`CachedDiffusionLikelihood`'s, i.e. the uncached ones.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mmalign.modalities.audio import AudioLDM2Likelihood, AudioLikelihood, pad_conditioning
from mmalign.modalities.diffusion import UNET_LAYOUT, PipelineLayout, load_parts
from mmalign.modalities.diffusion_cache import CACHED, CacheError, CachedDiffusionLikelihood, LatentCache, build_cached
from mmalign.types import PreferenceBatch

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


class CachedAudioLikelihood(CachedDiffusionLikelihood, AudioLikelihood):
    """Tango-style audio likelihood reading clips' latent distributions and prompts' conditioning
    from the cache (module docstring): no mel-VAE, no text encoder. Collate and draw are
    `CachedDiffusionLikelihood`'s; `prompt_conditioning` pads per batch as `AudioLikelihood`."""

    def __init__(self, cache: LatentCache, scheduler: Any, settings: Any) -> None:
        # AudioLikelihood's checks (null_prompt) with no VAE, encoders or tokenizers; AudioLDM2's
        # __init__ (a text pipeline around the encoders) is skipped.
        AudioLikelihood.__init__(self, None, [], [], scheduler, settings)
        self.cache = cache

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        raise CacheError("a cached likelihood has no text encoder: captions are looked up in the cache")

    def prompt_conditioning(self, batch: PreferenceBatch, groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        """Per-item (N, L, ...) conditioning: each item's cached caption tensors cut to its own
        length, the null prompt's where its group's caption is dropped (G,), right-padded with
        zeros to the longest (`pad_conditioning`), as `AudioLikelihood.prompt_conditioning`."""
        x = batch.inputs
        names = [k for k in x if k.startswith("prompt/")]
        device = x[names[0]].device
        null = cut_to_lengths({k: v.to(device) for k, v in self.cache.null.items()})
        rows = []
        for item, is_dropped in enumerate(dropped[groups].tolist()):
            if is_dropped:
                rows.append(null)
            else:
                rows.append(cut_to_lengths({k[len("prompt/"):]: x[k][item : item + 1] for k in names}))
        return pad_conditioning(rows)


class CachedAudioLDM2Likelihood(CachedAudioLikelihood, AudioLDM2Likelihood):
    """AudioLDM2 from the cache: the pipeline's UNet call (`AudioLDM2Likelihood.unet_kwargs`)
    and its gradient-checkpointing guard on cached GPT2 / T5 conditioning."""


CACHED.update({AudioLikelihood: CachedAudioLikelihood, AudioLDM2Likelihood: CachedAudioLDM2Likelihood})


def build_cached_audio(cfg: Any, cls: type, unet: bool = True,
                       layout: PipelineLayout = UNET_LAYOUT) -> tuple[Any, CachedAudioLikelihood, None]:
    """(UNet, cached audio likelihood, None) from `diffusion.cache_dir` (`build_cached`): only the
    UNet and the scheduler are loaded."""
    return build_cached(cfg, cls, load_parts(cfg, [], unet=unet, frozen=False, layout=layout))
