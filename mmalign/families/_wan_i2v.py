"""Wan image-to-video (a `wan` folder whose model_index.json names WanImageToVideoPipeline): Flow-DPO over
video latents conditioned on each record's first frame, `{source_image, prompt, chosen, rejected}`,
exactly as diffusers 0.42.1 WanImageToVideoPipeline (pipelines/wan/pipeline_wan_i2v.py) conditions:

- the source image through the pipeline's `VideoProcessor.preprocess(image, H, W)` (H = resolution,
  W = `diffusion.width` or H; resized to H x W, no crop, in [-1, 1]): video_condition = [image, zeros x
  (F - 1)] (3, F, H, W); the VAE's posterior MODE of it (`retrieve_latents(..., "argmax")`), normalised
  as `prepare_latents`: c_lat = (z - μ) · (1 / σ) (z, f, h, w); the mask m (4, f, h, w) = ones on
  latent frame 0 (the first pixel frame repeated scale_t = 4 times), zeros after; condition = [m, c_lat]
  (4 + z, f, h, w);
- Wan 2.1 I2V (a CLIP `image_encoder` / `image_processor` in the folder): image_embeds = the CLIP
  vision model's hidden_states[-2] of `image_processor(images=image)` (`encode_image`), (257, 1280);
  Wan 2.2 I2V A14B has none (transformer.config.image_dim is None) and gets none;
- the call: transformer(hidden_states = [x_t, condition] along channels (N, 2z + 4, f, h, w), timestep
  = σ·1000, encoder_hidden_states = the prompt's UMT5 states (512), encoder_hidden_states_image =
  image_embeds), as the loop's `torch.cat([latents, condition], dim=1)`.

The pipeline squashes the source image to H x W while the clips are resized to cover H x W and
cropped: give source images of the clips' H:W shape (e.g. the clip's first frame, cropped as `diffusion.crop`
crops it) so that the condition is the first frame the transformer learns to continue.
A pair's chosen and rejected share its source image (one condition per group, like the prompt). Caption
dropout drops the prompt only (the pipeline's negative branch keeps the image condition).
`mmalign cache` stores the clips' latents, each prompt's UMT5 states and each record's condition [and
image_embeds] once; training from `diffusion.cache_dir` then loads no VAE, UMT5 or CLIP encoder
(mmalign/families/_wan_i2v_cache.py). Not supported yet (ConfigError): `diffusion.random_flip` (a mirrored
clip would need the mirrored source image) and Wan 2.2 TI2V's expand_timesteps image conditioning.
`train.validate_every` writes videos continuing the first training records' source images
(_wan_i2v_validation.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.layout import batch_slots
from mmalign.modalities.diffusion import _output_names

SOURCE = "source_image"  # the record key (shared with the image-edit records)


def first_frame_mask(num_frames: int, scale_t: int, h: int, w: int) -> Tensor:
    """(1, scale_t, f, h, w) float32: `prepare_latents`' mask_lat_size for one image, f = (F - 1)/scale_t + 1."""
    mask = torch.ones(1, 1, num_frames, h, w)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=scale_t)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)
    return mask.view(1, -1, scale_t, h, w).transpose(1, 2)


class WanImageSource:
    """The source-image half of the I2V conditioning (module docstring): collate preprocesses each
    record's source image, per_item encodes each group's once."""

    def __init__(self, vae: Any, image_encoder: Any, image_processor: Any, settings: Any, roots: list[Any]) -> None:
        from diffusers.video_processor import VideoProcessor

        self.vae, self.settings, self.roots = vae, settings, roots
        self.image_encoder = image_encoder.requires_grad_(False).eval() if image_encoder is not None else None
        self.image_processor = image_processor
        self.video_processor = VideoProcessor(vae_scale_factor=int(vae.config.scale_factor_spatial))

    def to(self, device: torch.device | str) -> None:
        if self.image_encoder is not None:
            self.image_encoder.to(device)

    def source(self, record: dict[str, Any], where: str) -> Any:
        """A record's source image (PIL; a missing key or unreadable image: a DataError naming the row)."""
        from mmalign.data.media import load_image
        from mmalign.errors import DataError

        if SOURCE not in record:
            raise DataError(f"{where}: image-to-video records need a '{SOURCE}' (the first frame's image)")
        return load_image(record[SOURCE], where, record.get("_root") or self.roots)

    def prepare(self, record: dict[str, Any], where: str) -> tuple[Tensor, Tensor | None]:
        """A record's source image as the pipeline preprocesses it for height x width = resolution x
        (`diffusion.width` or resolution): pixels (1, 3, height, width) in [-1, 1] and the CLIP processor's
        pixel_values (1, 3, S, S), None without an image encoder."""
        image = self.source(record, where)
        height, width = self.settings.resolution, self.settings.width or self.settings.resolution
        pixels = self.video_processor.preprocess(image, height=height, width=width).float()
        if self.image_processor is None:
            return pixels, None
        return pixels, self.image_processor(images=image, return_tensors="pt").pixel_values

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """source_pixels (N, 3, H, W) in [-1, 1] [, clip_pixels (N, 3, S, S)] of each item's record's
        source image (`prepare`)."""
        pixels, clip = [], []
        for (i, _), where in zip(batch_slots(records, kind), _output_names(kind, records)):
            pixel, clip_pixel = self.prepare(records[i], where.rsplit(",", 1)[0] + f", {SOURCE}")
            pixels.append(pixel)
            if clip_pixel is not None:
                clip.append(clip_pixel)
        out = {"source_pixels": torch.cat(pixels)}
        if clip:
            out["clip_pixels"] = torch.cat(clip)
        return out

    @torch.no_grad()
    def condition(self, pixels: Tensor) -> Tensor:
        """(G, 4 + z, f, h, w) float32 of source pixels (G, 3, H, W): [mask, normalised VAE mode of
        [image, zeros x (F - 1)]] as `prepare_latents`."""
        c, frames = self.vae.config, self.settings.num_frames
        video = torch.cat([pixels[:, :, None], pixels.new_zeros(pixels.shape[0], 3, frames - 1, *pixels.shape[2:])], 2)
        with torch.autocast(pixels.device.type, enabled=False):
            z = self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float()
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1).to(z.device)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1).to(z.device)
        z = (z - mean) * inv_std
        mask = first_frame_mask(frames, int(c.scale_factor_temporal), *z.shape[-2:]).to(z.device)
        return torch.cat([mask.expand(z.shape[0], -1, -1, -1, -1), z], dim=1)

    @torch.no_grad()
    def image_states(self, clip: Tensor) -> Tensor:
        """(G, 257, D) float32: the CLIP vision model's hidden_states[-2] of processed pixels (G, 3, S, S)."""
        clip = clip.to(self.image_encoder.device, self.image_encoder.dtype)
        with torch.autocast(clip.device.type, enabled=False):
            return self.image_encoder(pixel_values=clip, output_hidden_states=True).hidden_states[-2].float()

    def per_item(self, inputs: dict[str, Any], groups: Tensor) -> dict[str, Tensor]:
        """condition (N, 4 + z, f, h, w) [, image_embeds (N, 257, D)]: each group's source encoded once."""
        first = (groups[None, :] == torch.arange(int(groups.max()) + 1)[:, None]).int().argmax(1)
        index = groups.to(inputs["source_pixels"].device)
        out = {"condition": self.condition(inputs["source_pixels"][first])[index]}
        if self.image_encoder is not None:
            out["image_embeds"] = self.image_states(inputs["clip_pixels"][first])[index]
        return out

    def encode_record(self, record: dict[str, Any], where: str) -> dict[str, Tensor]:
        """What `mmalign cache` stores of a record's source image (_wan_i2v_cache.py), on the CPU:
        condition (4 + z, f, h, w) [, image_embeds (257, D)], as `per_item` gives its items."""
        pixels, clip = self.prepare(record, where)
        out = {"condition": self.condition(pixels)[0].cpu()}
        if clip is not None:
            out["image_embeds"] = self.image_states(clip)[0].cpu()
        return out


class WanI2VConditioning:
    """The I2V conditioning source: the prompt (`TextConditioning`, dropped captions -> "") and the source
    image (`WanImageSource`, never dropped); validation: the records the validation videos continue
    (_wan_i2v_validation.py)."""

    def __init__(self, text: Any, image: WanImageSource, validation: list[dict[str, Any]] | None = None) -> None:
        self.text, self.image, self.validation = text, image, list(validation or [])

    @property
    def text_encoders(self) -> list[Any]:
        return self.text.text_encoders

    @property
    def tokenizers(self) -> list[Any]:
        return self.text.tokenizers

    def to(self, device: torch.device | str) -> None:
        self.text.to(device)
        self.image.to(device)

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        return self.text.encode_text(prompts)

    def cache_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """The prompt table `mmalign cache` stores (`TextConditioning.cache_text`: ragged UMT5 states)."""
        return self.text.cache_text(prompts)

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        return {**self.text.collate(records, kind), **self.image.collate(records, kind)}

    def per_item(self, inputs: dict[str, Any], groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        return {**self.text.per_item(inputs, groups, dropped), **self.image.per_item(inputs, groups)}


def check_i2v(cfg: Any, options: dict[str, Any]) -> None:
    """The I2V settings not supported yet are ConfigErrors (module docstring)."""
    from mmalign.errors import ConfigError

    d = cfg.diffusion
    for bad, why in ((d.random_flip, "diffusion.random_flip (the source image is not mirrored with the clip)"),
                     (bool(options.get("expand_timesteps", False)), "expand_timesteps (Wan 2.2 TI2V's image mode)")):
        if bad:
            raise ConfigError(f"Wan image-to-video: {why} is not supported yet; turn it off")


def load_image_encoder(cfg: Any, folder: str) -> tuple[Any, Any]:
    """(CLIPVisionModel, CLIPImageProcessor) of the folder's image_encoder / image_processor (Wan 2.1 I2V),
    (None, None) without them (Wan 2.2 I2V A14B)."""
    from pathlib import Path

    if not (Path(folder) / "image_encoder").is_dir():
        return None, None
    from transformers import CLIPImageProcessor, CLIPVisionModel

    encoder = CLIPVisionModel.from_pretrained(folder, subfolder="image_encoder", dtype=getattr(torch, cfg.model.dtype))
    return encoder, CLIPImageProcessor.from_pretrained(folder, subfolder="image_processor")
