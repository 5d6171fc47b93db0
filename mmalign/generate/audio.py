"""Clips from diffusers text-to-audio pipelines (AudioLDM2) in a local folder, for `mmalign generate`.

Each clip gets its own CPU `torch.Generator` (the pipeline draws each clip's initial latents,
and any stochastic scheduler noise, from it). Prompts are encoded one distinct prompt at a time:
AudioLDM2 pads the T5 tokens of a batch to its longest prompt and its GPT2 then generates the
conditioning AFTER the padding, so a clip would depend on the other prompts of its batch; one
prompt per call makes a clip a function of (prompt, seed, parameters) only. Clips are written
as 32-bit float WAV (lossless; browsers and soundfile read it) at the vocoder's rate.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmalign.errors import ConfigError
from mmalign.generate.images import RESERVED, image_params, pipeline_class_name, prepare_pipeline
from mmalign.generate.manifest import media_rows

AUDIO_RESERVED = RESERVED | {"num_waveforms_per_prompt", "transcription", "generated_prompt_embeds",
                             "negative_generated_prompt_embeds", "attention_mask", "negative_attention_mask"}


def load_audio_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, scheduler: str = "") -> Any:
    """A diffusers audio pipeline from a local folder with a model_index.json (no downloads).
    AudioLDM2's GPT2 is loaded as GPT2LMHeadModel (`modalities.audio.load_language_model`)."""
    import diffusers

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"{path}: audio generation needs a diffusers pipeline folder with a model_index.json")
    extra = {}
    if pipeline_class_name(path) == "AudioLDM2Pipeline":
        from mmalign.modalities.audio import load_language_model

        extra["language_model"] = load_language_model(path, dtype)
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **extra)
    return prepare_pipeline(pipe, scheduler)


def sample_rate(pipe: Any) -> int:
    vocoder = getattr(pipe, "vocoder", None)
    return int(vocoder.config.sampling_rate) if vocoder is not None else 16000


def audio_params(pipe: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters checked against the pipeline's `__call__` (as `image_params`), with the
    clip length recorded: audio_length_in_s defaults to the pipeline's own default length."""
    for key in params:
        if key in AUDIO_RESERVED:
            raise ConfigError(f"sampling parameter '{key}' is set by mmalign generate (one clip per seed)")
    out = image_params(pipe, params)
    signature = inspect.signature(pipe.__call__).parameters
    if "audio_length_in_s" in signature and out.get("audio_length_in_s") is None:
        unet, vocoder = pipe.unet.config, pipe.vocoder.config
        hop = float(np.prod(vocoder.upsample_rates)) / vocoder.sampling_rate
        out["audio_length_in_s"] = float(unet.sample_size * pipe.vae_scale_factor * hop)
    return out


def generate_audio(pipe: Any, prompts: list[str], seeds: list[int], params: dict[str, Any]) -> list[np.ndarray]:
    """One mono float32 clip per (prompt, seed), clip i from a CPU generator seeded seeds[i];
    one pipeline call per distinct prompt (module docstring)."""
    clips: list[np.ndarray | None] = [None] * len(prompts)
    kwargs = dict(params)
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        generators = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in rows]
        if isinstance(params.get("negative_prompt"), str):
            kwargs["negative_prompt"] = [params["negative_prompt"]] * len(rows)
        with torch.inference_mode():
            out = pipe(prompt=[prompt] * len(rows), generator=generators, num_waveforms_per_prompt=1,
                       output_type="np", **kwargs)
        for i, clip in zip(rows, out.audios, strict=True):
            clips[i] = np.asarray(clip, dtype=np.float32).reshape(-1)
    return clips  # type: ignore[return-value]


def audio_generator(opts: Any, path: Path, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    """(items -> rows with their WAV written, sampling params) for `mmalign generate` (run.py)."""
    import soundfile

    sampling = dict(opts.sampling)
    scheduler = sampling.pop("scheduler", "")
    pipe = load_audio_pipeline(path, getattr(torch, opts.dtype), scheduler).to(device)
    params = audio_params(pipe, sampling)
    call = dict(params)
    if scheduler:
        params["scheduler"] = scheduler
    rate, out = sample_rate(pipe), Path(opts.out)

    def run(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        clips = generate_audio(pipe, [it["prompt"] for it in items], [it["seed"] for it in items], call)
        return media_rows(items, clips, out, "audio", ".wav",
                          lambda clip, tmp: soundfile.write(str(tmp), clip, rate, format="WAV", subtype="FLOAT"))

    return run, params
