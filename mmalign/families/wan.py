"""Wan 2.1 / 2.2 text-to-video (`modality: wan`): Flow-DPO (`FlowObjective`, mmalign/modalities/flow.py)
over video latents on a `WanTransformer3DModel`, as diffusers' WanPipeline (pipelines/wan/
pipeline_wan.py, diffusers 0.42.1) encodes and calls it:

- conditioning (`_get_t5_prompt_embeds` / `encode_prompt`): each prompt through the pipeline's
  `prompt_clean` (ftfy when installed, HTML unescape, whitespace collapse), tokenized padded to
  max_sequence_length 512 (the pipeline's `__call__` default) with truncation, the UMT5 encoder's
  last_hidden_state under the attention mask; each row's real tokens kept and ZEROS past them up to
  512: c (n, 512, 4096 for umt5-xxl) float32;
- latents: `AutoencoderKLWan`, a causal 3-D VAE: clips (N, 3, F, H, W) in [-1, 1], F = 4k + 1,
  give (N, z, (F - 1)/4 + 1, H/8, W/8) (Wan 2.1; `scale_factor_temporal` / `scale_factor_spatial`
  of the VAE config); per-channel latents_mean / latents_std instead of a scaling factor: the latent
  x0 = (z - mean) / std (the pipeline decodes latents · std + mean; WanImageToVideoPipeline encodes
  its condition frames this way). `VideoLatents` returns the posterior already normalised, as
  `QwenLatents` does;
- the call (the denoising loop): transformer(hidden_states = x_t (N, C, f, h, w), timestep = t,
  encoder_hidden_states = c, return_dict=False)[0] with t the scheduler's timestep σ·1000
  (UniPCMultistepScheduler with use_flow_sigmas: timesteps = sigmas · num_train_timesteps);
  Wan 2.2 TI2V-5B (`expand_timesteps` in model_index.json) gets t once per latent token,
  (N, f·h/2·w/2);
- sign: the output goes to `scheduler.step` as a flow prediction: the velocity ε - x0, the target;
- shift: the scheduler config's `flow_shift` (Wan 2.1 T2V 480p: 3.0; 720p and Wan 2.2: 5.0), the
  shift `FlowObjective` applies to the logit-normal σ (s·u / (1 + (s - 1)·u), as UniPC's flow sigmas);
  a FlowMatchEulerDiscreteScheduler config gives its own `shift` (`flow_shift`).

Videos: a record's chosen / rejected is a video file or a folder of frames (mmalign/data/video.py),
`diffusion.num_frames` frames sampled evenly over the clip, each frame resized (shortest side
`diffusion.resolution`) and square-cropped, one crop and one flip per pair as for images. A
non-square crop (`diffusion.width`: Wan's 832x480 is resolution 480, width 832) resizes each frame
by the smallest factor that covers resolution x width (`resize_cover`), then crops it; latents
(z, f, resolution/s, width/s), the patch grid and the TI2V token count follow (the pipeline's
height / width arguments).
Dropped captions become encode("") (the pipeline's default negative prompt ""); `null_prompt:
zeros` is refused.

Wan 2.2 A14B (model_index.json: `boundary_ratio`, `transformer_2`): the trained model is a
`TwoExperts` (mmalign/modalities/experts.py): a drawn σ goes to `transformer` when σ·1000 >=
boundary_ratio · num_train_timesteps, else to `transformer_2`, as the pipeline's loop switches, for
the policy and the reference alike; `diffusion.train_experts` ([high, low] by default) names the
experts that train (LoRA or full), the others stay frozen; exports write both.

Image-to-video (model_index.json `_class_name: WanImageToVideoPipeline`: Wan 2.1 I2V with its CLIP image
encoder, Wan 2.2 I2V A14B without): records `{source_image, prompt, chosen, rejected}`, the transformer
fed [x_t, first-frame condition] (+ CLIP image states) as that pipeline's loop (mmalign/families/_wan_i2v.py);
its cache adds each record's condition (+ CLIP states) to the clips and prompts (_wan_i2v_cache.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.families._wan_i2v import WanI2VConditioning, WanImageSource, check_i2v, load_image_encoder
from mmalign.families._wan_i2v_cache import build_i2v_cached
from mmalign.modalities.diffusion import (DiffusionLikelihood, ImageLatents, UNetCall, _output_names, crop_offsets,
                                          data_roots, image_likelihood, resize_shortest, to_pixels)
from mmalign.modalities.diffusion_cache import build_cached
from mmalign.modalities.edit_validation import validation_records
from mmalign.modalities.experts import NAMES, TwoExperts
from mmalign.modalities.flow import FlowObjective, flow_shift
from mmalign.modalities.loading import denoiser_config, family_folder, from_cache, load_parts
from mmalign.modalities.ragged import PaddedText
from mmalign.modalities.text import MASK, TextConditioning

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default


class WanText(PaddedText):
    """UMT5 last hidden state of the cleaned prompt, zero past its tokens, 512 long (module docstring).
    `mmalign cache` stores each row at its prompt's real length (ragged.py), not 512."""

    padded = ("encoder_hidden_states",)

    def real_lengths(self, ids: dict[str, Tensor], cond: dict[str, Tensor]) -> Tensor:
        """(n,): each prompt's tokens (the tokenizer mask's count, at most 512)."""
        return ids[MASK].gt(0).sum(dim=1)

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any],
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> None:
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.max_sequence_length = max_sequence_length

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, 512), "input_ids_mask": (n, 512)}: `prompt_clean`ed prompts padded and
        truncated to max_sequence_length with the tokenizer's special tokens (UMT5's </s>)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        out = self.tokenizers[0]([prompt_clean(p) for p in prompts], padding="max_length",
                                 max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                 return_attention_mask=True, return_tensors="pt")
        return {"input_ids": out.input_ids, MASK: out.attention_mask}

    @torch.no_grad()
    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"encoder_hidden_states": (n, 512, D) float32}: row i is the encoder's output on its real
        tokens, zeros after (the pipeline's `u[:v]` then zero padding)."""
        encoder = self.text_encoders[0]
        tokens, mask = ids["input_ids"].to(encoder.device), ids[MASK].to(encoder.device)
        keep = mask.bool().any(dim=0)  # columns that are padding in every row change no real token
        with torch.autocast(tokens.device.type, enabled=False):
            hidden = encoder(tokens[:, keep], mask[:, keep]).last_hidden_state
        out = hidden.new_zeros(hidden.shape[0], self.max_sequence_length, hidden.shape[-1], dtype=torch.float32)
        for i, length in enumerate(mask.gt(0).sum(dim=1).tolist()):
            out[i, :length] = hidden[i, :length].float()
        return {"encoder_hidden_states": out}


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype x_t and the conditioning go in with: that of the patch embedding's weight, the first
    layer x_t meets (WanPipeline's `transformer.dtype`). Not the first parameter: Wan keeps
    `scale_shift_table`, the time embedder and the norms in float32 in a bf16 model
    (`_keep_in_fp32_modules`), and LoRA adapters may be float32 too. Found by name under any wrapper
    (DDP, peft, compile, `TwoExperts`: the high expert's)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "patch_embedding":
            return module.weight.dtype  # a peft-wrapped layer's `weight` is its base layer's
    raise ValueError(f"{type(model).__name__} has no patch_embedding: not a Wan transformer")


class WanTransformer(UNetCall):
    """The Wan transformer call of the pipeline's denoising loop (module docstring).
    expand_timesteps: Wan 2.2 TI2V's per-token timestep (model_index.json); image_to_video: the
    WanImageToVideoPipeline call, [x_t, condition] along channels (+ image_embeds) (_wan_i2v.py)."""

    def __init__(self, expand_timesteps: bool = False, image_to_video: bool = False) -> None:
        self.expand_timesteps, self.image_to_video = expand_timesteps, image_to_video

    def pipeline_options(self) -> dict[str, Any]:
        """WanPipeline's constructor option (`validation.PipelineOptions`): validation samples with it."""
        return {"expand_timesteps": self.expand_timesteps}

    def latent_channels(self, config: Any) -> int:
        """z: in_channels, or (in_channels - 4) / 2 of an I2V transformer ([x_t, mask, first-frame latents])."""
        return (int(config.in_channels) - 4) // 2 if self.image_to_video else int(config.in_channels)

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        """v_θ (N, C, f, h, w) float32 of x_t (N, C, f, h, w); inputs in `input_dtype(model)`."""
        dtype = input_dtype(model)
        t = values["timesteps"]  # σ·1000, the scheduler's timestep
        if self.expand_timesteps:
            n, _, f, h, w = noisy.shape
            t = t[:, None].expand(n, f * (h // 2) * (w // 2))
        extra = {}
        if self.image_to_video:
            noisy = torch.cat([noisy, values["condition"].to(noisy.device)], dim=1)
            if "image_embeds" in values:  # Wan 2.1 I2V's CLIP image states (none in Wan 2.2 I2V)
                extra["encoder_hidden_states_image"] = values["image_embeds"].to(dtype)
        return model(hidden_states=noisy.to(dtype), timestep=t, encoder_hidden_states=values[
            "encoder_hidden_states"].to(dtype), return_dict=False, **extra)[0].float()


def crop_size(settings: Any) -> tuple[int, int]:
    """(height, width) of the training crop: (resolution, width), width 0 meaning square."""
    return settings.resolution, settings.width or settings.resolution


def resize_cover(image: Any, height: int, width: int) -> Any:
    """PIL image resized by the smallest factor that makes it at least height x width (bilinear);
    a square crop is `resize_shortest` exactly (shortest side = height)."""
    from PIL import Image

    if height == width:
        return resize_shortest(image, height)
    w, h = image.size
    if width * h >= height * w:  # the width binds: w -> width
        size = (width, max(height, int(width * h / w)))
    else:
        size = (max(width, int(height * w / h)), height)
    return image if size == (w, h) else image.resize(size, Image.BILINEAR)


class VideoLatents(ImageLatents):
    """Clips -> normalised `AutoencoderKLWan` latents, live: collate reads `num_frames` frames per
    clip and resizes them, the draw crops and flips every frame of a clip alike and encodes."""

    def video(self, value: Any, where: str, root: str | None = None) -> list[Any]:
        from mmalign.data.video import load_video

        return load_video(value, where, root or self.roots, self.settings.num_frames)

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """pixel_values (N, 3, F, Hp, Wp) in [-1, 1] (each clip's frames resized to cover the crop,
        `resize_cover`, zero-padded to the batch's largest); sizes (N, 2) resized (h, w);
        original_sizes (N, 2) as decoded."""
        from mmalign.data.preference import flatten

        height, width = crop_size(self.settings)
        clips, sizes, originals = [], [], []
        for item, where in zip(flatten(records, kind), _output_names(kind, records)):
            frames = self.video(item["response"], where, item.get("_root"))
            originals.append((frames[0].height, frames[0].width))
            frames = [resize_cover(f, height, width) for f in frames]
            sizes.append((frames[0].height, frames[0].width))
            clips.append(torch.stack([to_pixels(f) for f in frames], dim=1))
        hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
        pixels = torch.zeros(len(clips), 3, clips[0].shape[1], hp, wp)
        for row, clip in enumerate(clips):
            pixels[row, :, :, : clip.shape[2], : clip.shape[3]] = clip
        return {"pixel_values": pixels, "sizes": torch.tensor(sizes), "original_sizes": torch.tensor(originals)}

    def augment(self, inputs: dict[str, Any], flip: Tensor, crop_fraction: Tensor) -> tuple[Tensor, Tensor]:
        """Crop (and flip) every frame of clip i alike: (N, 3, F, height, width), crop top-left (N, 2)."""
        height, width = crop_size(self.settings)
        sizes = inputs["sizes"].cpu()
        crop = torch.tensor([height, width])
        offsets = crop_offsets(sizes, crop, crop_fraction if self.settings.crop == "random" else None)
        crops = []
        for i, (top, left) in enumerate(offsets.tolist()):
            clip = inputs["pixel_values"][i, ..., top : top + height, left : left + width]
            crops.append(clip.flip(-1) if flip[i] else clip)
        mirrored_left = torch.where(flip, sizes[:, 1] - offsets[:, 1] - width, offsets[:, 1])
        return torch.stack(crops), torch.stack([offsets[:, 0], mirrored_left], dim=1)

    # -- what `mmalign cache` stores (cache_writer.py) -----------------------------------------
    def cache_settings(self, cfg: Any) -> dict[str, Any]:
        """The frame count changes the cached latents."""
        return video_cache_settings(cfg)

    def cache_item(self, value: Any, where: str, fraction: Tensor | None,
                   root: str | None = None) -> tuple[Tensor, list[int]]:
        """One clip read, resized and cropped as the uncached draw does: pixels (3, F, height, width)
        and [orig_h, orig_w, top, left, top, left_flipped] (`ImageLatents.cache_item`'s facts)."""
        height, width = crop_size(self.settings)
        frames = self.video(value, where, root)
        original = [frames[0].height, frames[0].width]
        frames = [resize_cover(f, height, width) for f in frames]
        h, w = frames[0].height, frames[0].width
        top, left = crop_offsets(torch.tensor([[h, w]]), torch.tensor([height, width]), fraction)[0].tolist()
        pixels = torch.stack([to_pixels(f) for f in frames], dim=1)[..., top : top + height, left : left + width]
        return pixels, [*original, top, left, top, w - left - width]

    def latent_shape(self) -> tuple[int, ...]:
        """(z_dim, (F - 1) / scale_t + 1, height / scale_s, width / scale_s) (the pipeline's prepare_latents)."""
        c = self.vae.config
        height, width = crop_size(self.settings)
        scale = int(c.scale_factor_spatial)
        return (int(c.z_dim), (self.settings.num_frames - 1) // int(c.scale_factor_temporal) + 1, height // scale,
                width // scale)

    def latent_scaling(self) -> tuple[float | None, float]:
        """The normalisation is already in `latent_dist`."""
        return None, 1.0

    def normalisation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        c = self.vae.config
        return (torch.tensor(c.latents_mean, device=device).view(1, -1, 1, 1, 1),
                torch.tensor(c.latents_std, device=device).view(1, -1, 1, 1, 1))

    @torch.no_grad()
    def latent_dist(self, pixels: Tensor, batch_size: int = 0) -> tuple[Tensor, Tensor]:
        """The normalised posterior of x0 = (z - μ) / σ: ((mean - μ) / σ, std / σ), (N, z, f, h, w)
        float32; the VAE in its dtype, autocast off, clips in chunks of `diffusion.vae_batch_size`."""
        step = batch_size or self.settings.vae_batch_size or pixels.shape[0]
        means, stds = [], []
        with torch.autocast(pixels.device.type, enabled=False):
            for start in range(0, pixels.shape[0], step):
                dist = self.vae.encode(pixels[start : start + step].to(self.vae.device, self.vae.dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        mean, std = torch.cat(means), torch.cat(stds)
        mu, sigma = self.normalisation(mean.device)
        return (mean - mu) / sigma, std / sigma


def video_cache_settings(cfg: Any) -> dict[str, Any]:
    """Settings a video cache must match beyond the image ones: {"num_frames"} (and "width" when set:
    a square cache keeps its settings)."""
    width = {"width": cfg.diffusion.width} if cfg.diffusion.width else {}
    return {"num_frames": cfg.diffusion.num_frames, **width}


def wan_shift(scheduler_config: Any, tokens: int) -> float:
    """The scheduler's shift: `flow_shift` of a UniPC config with flow sigmas (Wan's published
    scheduler), else a FlowMatchEulerDiscreteScheduler's (`flow.flow_shift`)."""
    from mmalign.errors import ConfigError

    c = scheduler_config
    if c.get("use_flow_sigmas", False):
        if c.get("use_dynamic_shifting", False):
            raise ConfigError("the scheduler config of model.path uses dynamic shifting with flow sigmas, which "
                              "no Wan pipeline uses; mmalign reads its static flow_shift")
        return float(c.get("flow_shift", 1.0))
    if "flow_shift" in c:
        raise ConfigError("the scheduler config of model.path has flow_shift without use_flow_sigmas: not a "
                          "flow-matching schedule")
    return flow_shift(c, tokens)


def wan_objective(prediction_type: str, patch: Sequence[int]) -> Callable[[Any, tuple[int, ...]], FlowObjective]:
    """objective(scheduler, latent_shape (C, f, h, w)) with the scheduler's shift (`wan_shift`); sides
    the transformer's (1, 2, 2) patch does not divide are a ConfigError."""
    def make(scheduler: Any, shape: tuple[int, ...]) -> FlowObjective:
        from mmalign.errors import ConfigError

        _, f, h, w = shape
        pt, ph, pw = patch
        if f % pt or h % ph or w % pw:
            raise ConfigError(f"diffusion.resolution / num_frames: latents {f}x{h}x{w} are not divisible into "
                              f"{pt}x{ph}x{pw} patches; choose a resolution that is a multiple of the VAE factor "
                              "times the patch size")
        return FlowObjective(scheduler, wan_shift(scheduler.config, f * (h // ph) * (w // pw)), prediction_type)

    return make


def pipeline_options(cfg: Any) -> dict[str, Any]:
    """model_index.json's WanPipeline settings of model.path ({} without one); `diffusion.train_experts`
    checked against it (two experts: a non-empty subset of [high, low]; one transformer: the default)."""
    from mmalign.errors import ConfigError

    index = Path(family_folder(cfg, FAMILY)) / "model_index.json"
    options = json.loads(index.read_text()) if index.is_file() else {}
    experts = list(cfg.diffusion.train_experts)
    if not two_experts(options):
        if sorted(experts) != ["high", "low"]:
            raise ConfigError(f"diffusion.train_experts {experts}: model.path {index.parent} has one transformer "
                              "(no boundary_ratio / transformer_2); the key is for two-expert Wan 2.2 folders")
        return options
    if not experts or len(set(experts)) != len(experts) or not set(experts) <= set(NAMES):
        raise ConfigError(f"diffusion.train_experts {experts}: give a non-empty subset of [high, low] "
                          "(high: transformer, low: transformer_2)")
    if options.get("expand_timesteps", False):
        raise ConfigError(f"model.path {index.parent}: two experts (boundary_ratio) with expand_timesteps, which no "
                          "Wan pipeline publishes; not supported")
    if (options.get("transformer") or [None])[0] is None:
        raise ConfigError(f"model.path {index.parent}: boundary_ratio without a high-noise transformer")
    return options


def two_experts(options: dict[str, Any]) -> bool:
    """A two-expert Wan 2.2 folder (A14B): boundary_ratio set and a transformer_2 (model_index.json)."""
    return options.get("boundary_ratio") is not None and (options.get("transformer_2") or [None])[0] is not None


def load_experts(cfg: Any, high: torch.nn.Module, options: dict[str, Any], scheduler: Any) -> TwoExperts:
    """`TwoExperts` of the loaded `transformer` (high noise) and model.path's `transformer_2`, the
    boundary b = boundary_ratio · num_train_timesteps as WanPipeline computes it; the experts of
    `diffusion.train_experts` train."""
    from diffusers import WanTransformer3DModel

    d = cfg.diffusion
    low = WanTransformer3DModel.from_pretrained(family_folder(cfg, FAMILY), subfolder="transformer_2",
                                                torch_dtype=getattr(torch, cfg.model.dtype),
                                                **({"variant": d.variant} if d.variant else {}))
    ratio = float(options["boundary_ratio"])
    return TwoExperts(high, low, ratio * int(scheduler.config.num_train_timesteps), ratio, tuple(d.train_experts))


def i2v_likelihood(cfg: Any, parts: dict[str, Any], text: WanText, denoiser: WanTransformer, objective: Any,
                   latents: VideoLatents) -> DiffusionLikelihood:
    """The image-to-video likelihood: the prompt and each record's source image (_wan_i2v.py)."""
    image = WanImageSource(parts["vae"], *load_image_encoder(cfg, family_folder(cfg, FAMILY)), cfg.diffusion,
                           data_roots(cfg))
    conditioning = WanI2VConditioning(TextConditioning(text, cfg.diffusion.null_prompt), image, validation_records(cfg))
    return DiffusionLikelihood(FAMILY, objective, latents, conditioning, denoiser, cfg.diffusion)


def check_frames(cfg: Any) -> None:
    """`diffusion.num_frames` must be 4k + 1 (the causal VAE's first frame plus groups of 4)."""
    from mmalign.errors import ConfigError

    n = cfg.diffusion.num_frames
    if n < 1 or (n - 1) % 4:
        raise ConfigError(f"diffusion.num_frames {n}: Wan's VAE takes 4k + 1 frames (e.g. 5, 17, 33, 81)")


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable WanTransformer3DModel, or `TwoExperts` of a Wan 2.2 A14B folder; likelihood owning the
    Wan VAE and the UMT5 encoder; None); from `diffusion.cache_dir` when set and use_cache (neither is
    loaded then)."""

    d = cfg.diffusion
    check_frames(cfg)
    options = pipeline_options(cfg)
    i2v = options.get("_class_name") == "WanImageToVideoPipeline"
    if i2v:
        check_i2v(cfg, options)
    denoiser = WanTransformer(bool(options.get("expand_timesteps", False)), i2v)
    objective = wan_objective(d.prediction_type, denoiser_config(cfg, FAMILY).patch_size)
    if from_cache(cfg, use_cache):
        cached = build_i2v_cached if i2v else build_cached
        model, likelihood, _ = cached(cfg, FAMILY, denoiser, trained, objective, video_cache_settings(cfg))
    else:
        parts = load_parts(cfg, FAMILY, unet=trained)
        text = WanText(parts["text_encoders"], parts["tokenizers"])
        latents = VideoLatents(parts["vae"], d, data_roots(cfg))
        if i2v:
            likelihood = i2v_likelihood(cfg, parts, text, denoiser, objective(parts["scheduler"], latents.latent_shape()),
                                        latents)
        else:
            likelihood = image_likelihood(cfg, FAMILY, parts, text, denoiser, objective, latents)
        model = parts["unet"]
    if trained and two_experts(options):
        model = load_experts(cfg, model, options, likelihood.scheduler)
    return model, likelihood, None


FAMILY = Family(
    name="wan", summary="Wan 2.1/2.2 text- and image-to-video DiT (A14B: two experts): UMT5 prompt, causal 3-D VAE, "
                "Flow-DPO over video latents",
    kind="video", build=build, trained="transformer",
    layout=PipelineLayout("transformer", "WanTransformer3DModel", "UniPCMultistepScheduler", "video pipeline",
                          vae_class="AutoencoderKLWan"),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:UMT5EncoderModel"),),
    pipeline="WanPipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="videos", zeros_null_prompt=False)
