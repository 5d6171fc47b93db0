"""AudioLDM2 (`modality: audioldm2`): a diffusers AudioLDM2Pipeline folder, the UNet trained on
mel-VAE latents (the clip parts in mmalign/modalities/audio.py). Conditioning from the pipeline's
own `encode_prompt` (CLAP text embedding + T5 -> AudioLDM2ProjectionModel -> GPT2's generated
embeddings); UNet call unet(x_t, t, encoder_hidden_states=GPT2 embeds, encoder_hidden_states_1=T5,
encoder_attention_mask_1=T5 mask), exactly as the pipeline's sampling loop calls it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.families.tango import audio_likelihood
from mmalign.modalities.audio import check_audio_config, load_language_model
from mmalign.modalities.diffusion import DiffusionLikelihood, UNetCall
from mmalign.modalities.loading import from_cache, load_parts


class AudioLDM2Prompt:
    """One prompt through AudioLDM2Pipeline.encode_prompt: {"encoder_hidden_states": (1,
    max_new_tokens, D_gpt2) GPT2 generated embeds, "encoder_hidden_states_1": (1, L, D_t5),
    "encoder_attention_mask_1": (1, L)} float32 / long. text_encoders: [ClapModel,
    T5EncoderModel, AudioLDM2ProjectionModel, GPT2 language model]."""

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any]) -> None:
        from diffusers import AudioLDM2Pipeline

        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        clap, t5, projection, language_model = self.text_encoders
        self.text_pipe = AudioLDM2Pipeline(vae=None, text_encoder=clap, text_encoder_2=t5, projection_model=projection,
                                           language_model=language_model, tokenizer=self.tokenizers[0],
                                           tokenizer_2=self.tokenizers[1], feature_extractor=None, unet=None,
                                           scheduler=None, vocoder=None)

    @torch.no_grad()
    def encode_one(self, prompt: str) -> dict[str, Tensor]:
        device = self.text_encoders[1].device
        with torch.autocast(device.type, enabled=False):
            t5, mask, generated = self.text_pipe.encode_prompt([prompt], device, 1, False)
        return {"encoder_hidden_states": generated.float(), "encoder_hidden_states_1": t5.float(),
                "encoder_attention_mask_1": mask}


class AudioLDM2UNet(UNetCall):
    """The pipeline's UNet call; an all-ones T5 mask (no padding in the batch) is left out, which
    changes nothing. diffusers 0.42's AudioLDM2 UNet passes the encoder mask into the SELF-attention
    mask slot when gradient checkpointing is on (positional arguments shifted in
    modeling_audioldm2.py), so a padded batch is refused there instead of being computed wrongly."""

    def kwargs(self, values: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Any]:
        mask = values["encoder_attention_mask_1"]
        return {"encoder_hidden_states": values["encoder_hidden_states"].to(dtype),
                "encoder_hidden_states_1": values["encoder_hidden_states_1"].to(dtype),
                "encoder_attention_mask_1": None if bool(mask.all()) else mask}

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        unet = getattr(model, "module", model)  # DDP-wrapped or not
        if getattr(unet, "is_gradient_checkpointing", False) and not bool(values["encoder_attention_mask_1"].all()):
            from mmalign.errors import ConfigError

            raise ConfigError("model.gradient_checkpointing with AudioLDM2: diffusers misroutes the text mask of a "
                              "padded batch under checkpointing; set train.batch_size 1 or gradient_checkpointing "
                              "false")
        return super().predict(model, noisy, values)


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, DiffusionLikelihood, None]:
    """(trainable AudioLDM2 UNet, likelihood owning the mel-VAE, CLAP, T5, projection model and
    GPT2, None); from `diffusion.cache_dir` when set and use_cache."""
    from diffusers import AudioLDM2ProjectionModel

    from mmalign.config import resolve_path

    check_audio_config(cfg)
    if from_cache(cfg, use_cache):
        from mmalign.modalities.audio_cache import build_cached_audio

        return build_cached_audio(cfg, FAMILY, AudioLDM2UNet(), trained)
    parts = load_parts(cfg, FAMILY, unet=trained)
    path, dtype = resolve_path(cfg.model.path), getattr(torch, cfg.model.dtype)
    projection = AudioLDM2ProjectionModel.from_pretrained(path, subfolder="projection_model", torch_dtype=dtype)
    encoder = AudioLDM2Prompt([*parts["text_encoders"], projection, load_language_model(path, dtype)],
                              parts["tokenizers"])
    return parts["unet"], audio_likelihood(cfg, FAMILY, parts, encoder, AudioLDM2UNet(), path), None


FAMILY = Family(
    name="audioldm2", summary="AudioLDM2 pipeline: mel-VAE latents, CLAP + T5 + GPT2 conditioning",
    kind="audio", build=build, trained="unet",
    layout=PipelineLayout(denoiser_class="AudioLDM2UNet2DConditionModel", kind="AudioLDM2 pipeline"),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:ClapModel"),
                   TextEncoderSpec("text_encoder_2", "tokenizer_2", "transformers:T5EncoderModel")),
    pipeline="AudioLDM2Pipeline", export_formats=("merged", "unet"), cache=True, sample="audio",
    zeros_null_prompt=False,
    unsupported={"lora": "diffusers' AudioLDM2Pipeline has no load_lora_weights"})
