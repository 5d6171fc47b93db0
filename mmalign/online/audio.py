"""Online rounds of audio families (`Family.sample == "audio"`: AudioLDM2, Tango; Tango 2's online
variant of its preference recipe, METHODS.md §2, D.1).

A clip is sampled with the family's own parts as training uses them, so it needs no diffusers
pipeline class (Tango has none): the prompt's conditioning from the likelihood's encoder (the
same tensors training conditions on; the null prompt is the encoded "", as caption dropout),
DDIM over the training scheduler's config with classifier-free guidance

    eps_hat = eps(x_t, "") + w * (eps(x_t, c) - eps(x_t, ""))      (eta = 0: deterministic given x_T)

from x_T ~ N(0, I) of shape (C, frames / f, n_mels / f) drawn by a CPU generator seeded with the
sample's seed; then the mel-VAE decodes x_0 / scaling_factor to a log-mel (1, frames, n_mels)
and the folder's vocoder (`vocoder/`, SpeechT5HifiGan) turns it into a waveform. Clips are
written as 32-bit float WAV under the round folder (media/<id>.wav) -> {"kind": "audio", "path"}.
`online.sampling`: num_inference_steps (default 20), guidance_scale (default 2.5).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError
from mmalign.io import atomic_path

AUDIO_SAMPLING: dict[str, Any] = {"num_inference_steps": 20, "guidance_scale": 2.5}


def audio_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """AUDIO_SAMPLING completed with `online.sampling`; an unknown key or a bad value names it."""
    out = dict(AUDIO_SAMPLING)
    for key, value in sampling.items():
        if key not in AUDIO_SAMPLING:
            raise ConfigError(f"online.sampling: unknown sampling parameter '{key}' for audio; valid: "
                              f"{', '.join(AUDIO_SAMPLING)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"online.sampling.{key}: expected a number, got {value!r}")
        out[key] = value
    if int(out["num_inference_steps"]) < 1:
        raise ConfigError(f"online.sampling.num_inference_steps must be >= 1, got {out['num_inference_steps']}")
    return out


@lru_cache(maxsize=2)
def load_vocoder(path: str) -> Any:
    """The SpeechT5HifiGan of `<model folder>/vocoder` (local files only), eval mode, float32."""
    from transformers import SpeechT5HifiGan

    from mmalign.config import resolve_path

    folder = Path(resolve_path(path)) / "vocoder"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"online audio rounds need a vocoder: {folder} not found (model.path's vocoder/)")
    return SpeechT5HifiGan.from_pretrained(folder, local_files_only=True).eval()


def guided_latents(likelihood: Any, model: torch.nn.Module, prompt: str, seeds: list[int],
                   steps: int, guidance: float) -> Tensor:
    """(n, C, h, w) x_0 of n clips of one prompt (DDIM, CFG against the encoded "", module docstring)."""
    import diffusers

    from mmalign.modalities.audio import pad_conditioning

    device = next(model.parameters()).device
    scheduler = diffusers.DDIMScheduler.from_config(likelihood.scheduler.config, clip_sample=False,
                                                    prediction_type=likelihood.prediction_type)
    scheduler.set_timesteps(steps, device=device)
    n = len(seeds)
    pair = pad_conditioning([likelihood.encode_text([""]), likelihood.encode_text([prompt])])  # (2, ...)
    values = {k: v.to(device).repeat_interleave(n, dim=0) for k, v in pair.items()}  # uncond x n, cond x n
    shape = likelihood.latents.latent_shape()
    x = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])
    x = x.to(device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inputs = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = likelihood.denoiser.predict(model, inputs, {**values, "timesteps": t.expand(2 * n)}).float()
        uncond, cond = out.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


def decode_clips(likelihood: Any, vocoder: Any, latents: Tensor) -> list[Any]:
    """(n, C, h, w) latents -> n mono float32 numpy waveforms (mel-VAE, then the vocoder)."""
    vae = likelihood.vae
    shift, scaling = likelihood.latents.latent_scaling()
    z = latents.float() / scaling + (shift or 0.0)
    with torch.autocast(z.device.type, enabled=False):
        mel = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()  # (n, 1, frames, n_mels)
        wave = vocoder.to(mel.device)(mel.squeeze(1))
    return [w.reshape(-1).float().cpu().numpy() for w in wave]


def sample_audio(ctx: Any, model: torch.nn.Module, job: Any) -> list[dict[str, Any]]:
    """N clips of the policy UNet `model`, clip i from seed job.seeds[i]; one guided DDIM run per
    distinct prompt and batch; each saved as job.folder/media/<id>.wav (atomic)."""
    import soundfile

    likelihood = ctx.likelihood
    if likelihood.vae is None:
        raise ConfigError("online audio rounds need the mel-VAE and text encoders: remove diffusion.cache_dir")
    params = audio_sampling(ctx.sampling)
    vocoder = load_vocoder(ctx.model_path)
    rate = int(vocoder.config.sampling_rate)
    clips: list[Any] = [None] * len(job.prompts)
    for prompt in dict.fromkeys(job.prompts):
        rows = [i for i, p in enumerate(job.prompts) if p == prompt]
        for start in range(0, len(rows), ctx.batch_size):
            part = rows[start:start + ctx.batch_size]
            latents = guided_latents(likelihood, model, prompt, [job.seeds[i] for i in part],
                                     int(params["num_inference_steps"]), float(params["guidance_scale"]))
            for i, clip in zip(part, decode_clips(likelihood, vocoder, latents), strict=True):
                clips[i] = clip
    out = []
    for sample_id, clip in zip(job.ids, clips, strict=True):
        relative = f"media/{sample_id}.wav"
        with atomic_path(job.folder / relative) as tmp:
            soundfile.write(str(tmp), clip, rate, format="WAV", subtype="FLOAT")
        out.append({"kind": "audio", "path": relative})
    return out
