"""Diffusion-DPO ELBO likelihood for diffusers UNet families (SD1.5, SD2 v-prediction; SDXL
builds on it in `sdxl.py`).

Per pair, ONE timestep t ~ U{0..T-1} and ONE noise ε are drawn and shared by the chosen
and the rejected image, under the policy and the reference (Wallace et al., METHODS.md §2):

    x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε
    target = ε (epsilon) | v = √ᾱ_t ε - √(1-ᾱ_t) x0 (v_prediction) | x0 (sample)
    mse = mean over every non-batch dim of (pred_θ(x_t, t, c) - target)²
    logp = -0.5 · mse

The official loss -log σ(-0.5·β·[(mse_θ(w) - mse_θ(l)) - (mse_ref(w) - mse_ref(l))]) is then
exactly the common `dpo` loss -log σ(β d) with the SAME β as the paper (5000 for SD1.5 and
SDXL). The diffusers research script's β 2500 (no 0.5) equals our 5000.

Data: pair records {"prompt", "chosen", "rejected"} whose outputs are images (a path relative
to the data file's folder, bytes, or {"bytes", "path"}). `collate` is deterministic (resize the
shortest side to `diffusion.resolution`); every random choice (crop offset, flip, caption
dropout, t, ε, the VAE latent sample) is made in `draw` from the step's generator, so the
policy and the reference see the same draw and a resumed run repeats it exactly. Randomness
is drawn in a fixed order whatever the options (flip, crop, dropout, t, ε, latent), so
switching flips on does not change t or ε.

Null prompt: dropped captions become `encode("")` (the official Diffusion-DPO training). The
SDXL pipeline's `force_zeros_for_empty_prompt` instead feeds ZEROS for an empty negative
prompt at sampling time; `diffusion.null_prompt: zeros` trains with zeros to match that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mmalign.data.media import load_image
from mmalign.data.preference import batch_fields, data_folder, flatten
from mmalign.types import Draw, LogpOutput, PreferenceBatch


# -- pure helpers ------------------------------------------------------------------
def group_index(kind: str, num_items: int, num_records: int) -> Tensor:
    """(N,) group of each item: items of a group share t, ε, crop, flip and caption dropout.

    pair: chosen i and rejected i (rows i and B+i) form group i; ranked: the K items of a
    list; unpaired: every item alone (Diffusion-KTO)."""
    if kind == "pair":
        return torch.arange(num_records).repeat(2)
    if kind == "ranked":
        return torch.arange(num_records).repeat_interleave(num_items // num_records)
    return torch.arange(num_items)


def example_generators(index: Tensor, generator: torch.Generator | None) -> list[torch.Generator | None]:
    """One generator per example (group), seeded by the step generator's seed and the example's
    row in the data (`batch.index`): a pair's t, ε, flip, crop, dropout and latent sample do not
    depend on the process, micro-batch or batch position it lands in, so 2 processes draw what
    1 process draws. No generator: the global RNG for all."""
    if generator is None:
        return [None] * len(index)
    base = generator.initial_seed()
    return [torch.Generator().manual_seed((base * 1_000_003 + row * 7_919 + 17) % 2**63) for row in index.tolist()]


def item_normals(shape: Sequence[int], groups: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """(N, *shape[1:]) standard normals, row r from its group's generator (rows in order)."""
    return torch.stack([torch.randn(tuple(shape[1:]), generator=generators[g]) for g in groups.tolist()])


def resize_shortest(image: Any, resolution: int) -> Any:
    """PIL image with its shortest side resized to `resolution` (bilinear; long side as
    torchvision's Resize(int): int(resolution · long / short))."""
    from PIL import Image

    w, h = image.size
    if w <= h:
        size = (resolution, int(resolution * h / w))
    else:
        size = (int(resolution * w / h), resolution)
    return image if size == (w, h) else image.resize(size, Image.BILINEAR)


def to_pixels(image: Any) -> Tensor:
    """PIL RGB image -> (3, H, W) float32 in [-1, 1]."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


def crop_offsets(sizes: Tensor, resolution: int, fraction: Tensor | None) -> Tensor:
    """Top-left (N, 2) of a resolution×resolution crop of images of `sizes` (N, 2) = (h, w).

    fraction None: centre crop, int(round((h - res) / 2)) as torchvision's CenterCrop;
    otherwise fraction (N, 2) in [0, 1) picks floor(f · (h - res + 1)) uniformly. A pair uses
    one fraction, so two images of the same size get the same crop."""
    slack = (sizes - resolution).clamp(min=0)
    if fraction is None:
        return torch.round(slack.double() / 2).long()  # round-half-even like Python's round
    return torch.floor(fraction.double() * (slack + 1).double()).long().clamp(max=slack)


def prediction_target(scheduler: Any, prediction_type: str, latents: Tensor, noise: Tensor,
                      timesteps: Tensor) -> Tensor:
    """ε (epsilon), v = √ᾱ_t ε - √(1-ᾱ_t) x0 (v_prediction) or x0 (sample); shapes of `latents`."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type '{prediction_type}' (epsilon, v_prediction, sample)")


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # chat messages: the caption is their text
        return " ".join(str(m.get("content", "")) for m in prompt)
    return str(prompt)


def _output_names(kind: str, records: list[dict[str, Any]]) -> list[str]:
    """"row R, field" of every flattened item (R: the dataset row, plus the record's `source`
    such as a Pick-a-Pic shard:row when it has one), for error messages."""
    rows = [f"{r.get('_index', i)}" + (f" ({r['source']})" if r.get("source") else "") for i, r in enumerate(records)]
    if kind == "pair":
        return [f"row {i}, chosen" for i in rows] + [f"row {i}, rejected" for i in rows]
    if kind == "ranked":
        return [f"row {i}, completions[{k}]" for i, r in zip(rows, records) for k in range(len(r["completions"]))]
    return [f"row {i}, completion" for i in rows]


# -- the likelihood ----------------------------------------------------------------
class DiffusionLikelihood:
    """Implicit log-likelihood -0.5·mse of an image under a diffusers UNet (SD1.5, SD2).

    vae: frozen AutoencoderKL (kept in `settings.vae_dtype`, run outside autocast).
    text_encoders, tokenizers: frozen CLIP text encoder(s) and their tokenizers.
    scheduler: a DDPMScheduler (its alphas_cumprod define x_t and the v target).
    settings: the `DiffusionConfig` section. roots: folders that relative image paths are
    resolved against (the train and eval files' folders), first match wins.
    """

    deterministic = False  # t, ε and the latent sample change every step
    items_key = "pixel_values"  # the batch input whose rows are the items (`draw`)

    def __init__(self, vae: Any, text_encoders: Sequence[Any], tokenizers: Sequence[Any], scheduler: Any,
                 settings: Any, roots: Sequence[str | Path] = ()) -> None:
        self.vae = None if vae is None else vae.requires_grad_(False).eval()  # None: latents from a cache
        self.text_encoders = [e.requires_grad_(False).eval() for e in text_encoders]
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler
        self.settings = settings
        self.roots = [Path(r) for r in roots]
        self.prediction_type = self.resolve_prediction_type(settings, scheduler)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def resolve_prediction_type(self, settings: Any, scheduler: Any) -> str:
        """`diffusion.prediction_type`, else the scheduler config's (a flow likelihood, whose
        scheduler has none, overrides this)."""
        return settings.prediction_type or scheduler.config.prediction_type

    @classmethod
    def denoiser_kwargs(cls, denoiser: Any) -> dict[str, Any]:
        """Constructor keyword arguments read off the loaded denoiser's config (`build_family`);
        none for a UNet."""
        return {}

    def to(self, device: torch.device | str) -> "DiffusionLikelihood":
        """Move the frozen VAE and text encoders (dtypes unchanged)."""
        if self.vae is not None:
            self.vae.to(device)
        for encoder in self.text_encoders:
            encoder.to(device)
        return self

    # -- collate: deterministic ------------------------------------------------------
    def _image(self, value: Any, where: str, root: str | None = None) -> Any:
        """`root`: the record's own data folder (`_root`, set by the trainer), else the data folders."""
        return load_image(value, where, root or self.roots)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, L)[, "input_ids_2": (n, L2)]}: padded to each tokenizer's max length."""
        out = {}
        for i, tok in enumerate(self.tokenizers):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = ids
        return out

    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        """records -> batch of N images (2B for pairs: chosen rows first, then rejected).

        inputs: pixel_values (N, 3, Hp, Wp) in [-1, 1], each image resized (shortest side =
        resolution) and zero-padded to the batch's largest size; sizes (N, 2) its resized
        (h, w); original_sizes (N, 2) (h, w) as loaded; input_ids (N, L) [input_ids_2]."""
        res = self.settings.resolution
        items = flatten(records, kind)
        images, sizes, originals = [], [], []
        for item, where in zip(items, _output_names(kind, records)):
            image = self._image(item["response"], where, item.get("_root"))
            originals.append((image.height, image.width))
            image = resize_shortest(image, res)
            sizes.append((image.height, image.width))
            images.append(to_pixels(image))
        hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
        pixels = torch.zeros(len(images), 3, hp, wp)
        for row, image in enumerate(images):
            pixels[row, :, : image.shape[1], : image.shape[2]] = image
        inputs = {"pixel_values": pixels, "sizes": torch.tensor(sizes), "original_sizes": torch.tensor(originals)}
        inputs.update(self.tokenize([_prompt_text(item["prompt"]) for item in items]))
        return batch_fields(records, kind, inputs)

    # -- draw: all the randomness, once per batch -----------------------------------------
    def augment(self, batch: PreferenceBatch, flip: Tensor, crop_fraction: Tensor) -> tuple[Tensor, Tensor]:
        """Crop and flip per item with its group's choices.

        flip (N,) bool; crop_fraction (N, 2). Returns pixels (N, 3, res, res) and the crop
        top-left (N, 2) in the coordinates of the (flipped) resized image, as SDXL's
        `crops_coords_top_left` (a flipped crop's left is w - left - res)."""
        res, x = self.settings.resolution, batch.inputs
        sizes = x["sizes"].cpu()
        random_crop = self.settings.crop == "random"
        offsets = crop_offsets(sizes, res, crop_fraction if random_crop else None)
        crops = []
        for i, (top, left) in enumerate(offsets.tolist()):
            crop = x["pixel_values"][i, :, top : top + res, left : left + res]
            crops.append(crop.flip(-1) if flip[i] else crop)
        mirrored_left = torch.where(flip, sizes[:, 1] - offsets[:, 1] - res, offsets[:, 1])
        return torch.stack(crops), torch.stack([offsets[:, 0], mirrored_left], dim=1)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent: h = w = resolution / 2^(number of VAE blocks - 1)."""
        c = self.vae.config
        side = self.settings.resolution // 2 ** (len(c.block_out_channels) - 1)
        return (c.latent_channels, side, side)

    @torch.no_grad()
    def latent_dist(self, pixels: Tensor, batch_size: int = 0) -> tuple[Tensor, Tensor]:
        """The VAE's posterior of pixels (N, 3, res, res): mean, std (N, C, h, w) float32,
        unscaled. The VAE runs in its own dtype with autocast OFF (no fp16 NaN latents), in
        chunks of `batch_size` images (0: `diffusion.vae_batch_size`, else all at once)."""
        vae = self.vae
        step = batch_size or self.settings.vae_batch_size or pixels.shape[0]
        means, stds = [], []
        with torch.autocast(pixels.device.type, enabled=False):
            for start in range(0, pixels.shape[0], step):
                dist = vae.encode(pixels[start : start + step].to(vae.device, vae.dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def latent_scaling(self) -> tuple[float | None, float]:
        """(shift_factor or None, scaling_factor) of the VAE's latent space."""
        return getattr(self.vae.config, "shift_factor", None), float(self.vae.config.scaling_factor)

    def sample_latents(self, mean: Tensor, std: Tensor, eta: Tensor) -> Tensor:
        """(mean + std · η - shift_factor) · scaling_factor, all (N, C, h, w) float32."""
        shift, scale = self.latent_scaling()
        latents = mean + std * eta.to(mean.device)
        if shift is not None:
            latents = latents - shift
        return latents * scale

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, latent_noise_fn: Any) -> Tensor:
        """VAE latents (N, C, h, w) float32 = (sample - shift_factor) · scaling_factor.

        The sample is mean + std · η with η from `latent_noise_fn(shape)` (the step's
        generator); see `latent_dist` for how the VAE runs."""
        mean, std = self.latent_dist(pixels)
        return self.sample_latents(mean, std, latent_noise_fn(mean.shape))

    @torch.no_grad()
    def encode_prompt(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Text conditioning of n prompts from their token ids: {"encoder_hidden_states":
        (n, L, D)}, the text encoder's last hidden state (SD1.5/SD2 pipelines)."""
        encoder = self.text_encoders[0]
        ids = inputs["input_ids"].to(encoder.device)
        with torch.autocast(ids.device.type, enabled=False):
            return {"encoder_hidden_states": encoder(ids)[0].float()}

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Text conditioning of plain strings, e.g. `encode_text([""])` is the null prompt."""
        return self.encode_prompt(self.tokenize(prompts))

    def prompt_conditioning(self, batch: PreferenceBatch, groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        """Encode each group's prompt once (its first item), null prompt where `dropped` (G,);
        returns per-item (N, ...) tensors."""
        first = (groups[None, :] == torch.arange(int(groups.max()) + 1)[:, None]).int().argmax(1)
        ids = {k: v[first.to(v.device)] for k, v in batch.inputs.items() if k.startswith("input_ids")}
        if self.settings.null_prompt == "empty" and bool(dropped.any()):
            empty = self.tokenize([""])
            ids = {k: torch.where(dropped.to(v.device)[:, None], empty[k].to(v.device), v) for k, v in ids.items()}
        cond = self.encode_prompt(ids)
        if self.settings.null_prompt == "zeros":
            cond = {k: v * (~dropped).to(v.device, v.dtype).view(-1, *[1] * (v.ndim - 1)) for k, v in cond.items()}
        return {k: v[groups.to(v.device)] for k, v in cond.items()}

    def extra_conditioning(self, batch: PreferenceBatch, crop_top_left: Tensor) -> dict[str, Tensor]:
        """Further per-item conditioning made in the draw (SDXL's add_time_ids); none here."""
        return {}

    def draw_time(self, num_groups: int, generator: torch.Generator | None) -> Tensor:
        """(G,) the per-group noise level: timesteps t ~ U{0..T-1} (long) for a UNet; a flow
        likelihood draws its σ here instead (one call to the generator's stream either way)."""
        return torch.randint(0, self.num_train_timesteps, (num_groups,), generator=generator)

    def time_values(self, times: Tensor, device: torch.device) -> dict[str, Tensor]:
        """The draw's values of the per-item (N,) `draw_time` output: {"timesteps"}."""
        return {"timesteps": times.to(device)}

    def draw_choices(self, kind: str, num_items: int,
                     generators: list[torch.Generator | None]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The per-group random choices, each group from its own generator (`example_generators`)
        in the fixed order every draw uses (the cached draw of `diffusion_cache.py` too): flip,
        crop fraction (2 values), caption dropout, then `draw_time` (timestep long, or σ); later
        `draw_latents` takes ε and then the latent sample of each of the group's images.
        Returns groups (N,), flip (G,) bool, crop_fraction (G, 2), dropped (G,) bool, times (G,)."""
        groups = group_index(kind, num_items, len(generators))
        u = torch.stack([torch.rand(4, generator=g) for g in generators])  # (G, 4)
        times = torch.cat([self.draw_time(1, g) for g in generators])
        flip = (u[:, 0] < 0.5) & self.settings.random_flip
        return groups, flip, u[:, 1:3], u[:, 3] < self.settings.caption_dropout, times

    def draw_latents(self, batch: PreferenceBatch, groups: Tensor, flip: Tensor, crop_fraction: Tensor,
                     generators: list[torch.Generator | None]) -> tuple[Tensor, Tensor, Tensor]:
        """x0 (N, C, h, w) float32, ε (G, C, h, w) and the crop top-left (N, 2): crop and flip
        the pixels, draw ε per group, then the VAE latent sample per image (`item_normals`)."""
        pixels, crop_top_left = self.augment(batch, flip[groups], crop_fraction[groups])
        noise = torch.stack([torch.randn(self.latent_shape(), generator=g) for g in generators])
        latents = self.encode_images(pixels, lambda shape: item_normals(shape, groups, generators))
        return latents, noise, crop_top_left

    def draw(self, batch: PreferenceBatch, generator: torch.Generator | None = None) -> Draw:
        """Per group (pair) g: flip, crop fraction, caption dropout, t_g ~ U{0..T-1} (`draw_time`),
        ε_g; per image: the VAE latent sample, all from the group's own generator
        (`example_generators`: the step's seed + the example's data row). Values (N = 2B rows for
        pairs, chosen then rejected): latents, noise (N, C, h, w) float32; timesteps (N,) long
        (`time_values`); caption_dropped (N,) bool; the text conditioning (encoder_hidden_states
        (N, L, D), ...); plus the subclass's extra conditioning."""
        n = batch.inputs[self.items_key].shape[0]
        generators = example_generators(batch.index, generator)
        groups, flip, crop_fraction, dropped, times = self.draw_choices(batch.kind, n, generators)
        latents, noise, crop_top_left = self.draw_latents(batch, groups, flip, crop_fraction, generators)
        values = {"latents": latents, "noise": noise[groups].to(latents.device),
                  **self.time_values(times[groups], latents.device), "caption_dropped": dropped[groups]}
        values.update(self.prompt_conditioning(batch, groups, dropped))
        values.update(self.extra_conditioning(batch, crop_top_left))
        return Draw(values)

    # -- logps ----------------------------------------------------------------------------
    def unet_kwargs(self, draw: Draw, dtype: torch.dtype) -> dict[str, Any]:
        """Conditioning keyword arguments of the UNet call."""
        return {"encoder_hidden_states": draw.values["encoder_hidden_states"].to(dtype)}

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw) -> LogpOutput:
        """logps (N,) = -0.5 · mse; diagnostics {"mse": (N,)} (float32).

        x_t = scheduler.add_noise(x0, ε, t); mse = mean over C, H, W of (unet(x_t, t, c) - target)²."""
        v = draw.values
        latents, noise, timesteps = v["latents"], v["noise"], v["timesteps"]
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(self.scheduler, self.prediction_type, latents, noise, timesteps)
        dtype = next(model.parameters()).dtype
        pred = model(noisy.to(dtype), timesteps, **self.unet_kwargs(draw, dtype), return_dict=False)[0]
        mse = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
        return LogpOutput(logps=-0.5 * mse, diagnostics={"mse": mse})

    def validate(self, model: torch.nn.Module, step: int, folder: str | Path) -> dict[str, float]:
        """The trainer's `train.validate_every` hook: a PNG grid of the configured prompts × seeds
        sampled with `model` in `folder` (`validation.validate_images`)."""
        from mmalign.modalities.validation import validate_images

        d = self.settings
        return validate_images(self, model, step, folder, d.validation_prompts, d.validation_seeds,
                               d.validation_steps, d.validation_guidance)


# -- loading a local diffusers pipeline folder ------------------------------------------
def data_roots(cfg: Any) -> list[Path]:
    """Folders of the train and eval data files, in order (`data_folder` of each): where a record
    without its own `_root` has its relative media paths looked up (held by two of them as
    different files: an error)."""
    roots: list[Path] = []
    for entry in (cfg.data.train, cfg.data.eval):
        for path in [entry] if isinstance(entry, str) else entry:
            root = data_folder(path)
            if path and root not in roots:
                roots.append(root)
    return roots


@dataclass(frozen=True)
class PipelineLayout:
    """Where a family's trainable denoiser lives in a diffusers pipeline folder and the diffusers
    classes of it and of the training scheduler; `kind` names the folder in errors."""

    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    scheduler_class: str = "DDPMScheduler"
    kind: str = "pipeline"


UNET_LAYOUT = PipelineLayout()


def load_parts(cfg: Any, encoders: Sequence[tuple[Any, ...]], unet: bool = True, frozen: bool = True,
               layout: PipelineLayout = UNET_LAYOUT) -> dict[str, Any]:
    """Load the denoiser (key "unet", also for a flow transformer), vae, scheduler and the text
    encoders (subfolder, tokenizer subfolder, class[, required]) from the local pipeline folder
    `cfg.model.path` (no downloads); `layout` names the denoiser's subfolder and the classes.
    An optional encoder (required False) whose folder is missing is skipped (SD3 without T5).
    unet=False skips the denoiser (`mmalign cache`), frozen=False the VAE, text encoders and
    tokenizers (training from a cache); a skipped part is None (text_encoders/tokenizers: [])."""
    import diffusers
    from transformers import AutoTokenizer

    from mmalign.config import ConfigError, resolve_path

    path, d = resolve_path(cfg.model.path), cfg.diffusion
    if not (Path(path) / layout.denoiser).is_dir():
        raise ConfigError(f"model.path {path} is not a local diffusers {layout.kind} folder "
                          f"(no {layout.denoiser}/ inside)")
    variant = {"variant": d.variant} if d.variant else {}
    dtype = getattr(torch, cfg.model.dtype)
    scheduler = getattr(diffusers, layout.scheduler_class).from_pretrained(path, subfolder="scheduler")
    parts: dict[str, Any] = {"unet": None, "vae": None, "text_encoders": [], "tokenizers": [], "scheduler": scheduler}
    if unet:
        parts["unet"] = getattr(diffusers, layout.denoiser_class).from_pretrained(
            path, subfolder=layout.denoiser, torch_dtype=dtype, **variant)
    if frozen:
        vae_path, vae_sub = (d.vae_path, None) if d.vae_path else (path, "vae")
        parts["vae"] = diffusers.AutoencoderKL.from_pretrained(vae_path, subfolder=vae_sub,
                                                               torch_dtype=getattr(torch, d.vae_dtype), **variant)
        present = [e[:3] for e in encoders if all(e[3:]) or (Path(path) / e[0]).is_dir()]
        parts["text_encoders"] = [enc.from_pretrained(path, subfolder=sub, dtype=dtype, **variant)
                                  for sub, _, enc in present]
        parts["tokenizers"] = [AutoTokenizer.from_pretrained(path, subfolder=tok) for _, tok, _ in present]
    return parts


def build_family(cfg: Any, cls: type, encoders: Sequence[tuple[Any, ...]], use_cache: bool = True,
                 unet: bool = True, layout: PipelineLayout = UNET_LAYOUT) -> tuple[Any, DiffusionLikelihood, None]:
    """(denoiser, likelihood of class `cls`, None) from the pipeline folder (`load_parts`); the
    likelihood takes the keyword arguments `cls.denoiser_kwargs(denoiser)` reads off the denoiser.
    With `diffusion.cache_dir` set (and use_cache), the likelihood reads latents and text
    embeddings from that cache and NO VAE or text encoder is loaded
    (`diffusion_cache.CachedDiffusionLikelihood`); unet=False skips the denoiser."""
    if use_cache and cfg.diffusion.cache_dir:
        from mmalign.modalities.diffusion_cache import build_cached

        return build_cached(cfg, cls, load_parts(cfg, encoders, unet=unet, frozen=False, layout=layout))
    parts = load_parts(cfg, encoders, unet=unet, layout=layout)
    likelihood = cls(parts["vae"], parts["text_encoders"], parts["tokenizers"], parts["scheduler"],
                     cfg.diffusion, data_roots(cfg), **cls.denoiser_kwargs(parts["unet"]))
    return parts["unet"], likelihood, None


def build(cfg: Any, use_cache: bool = True, unet: bool = True) -> tuple[torch.nn.Module, DiffusionLikelihood, None]:
    """SD1.5 / SD2 (modality `sd`): (trainable UNet, likelihood owning VAE + text encoder, None);
    from the cache in `diffusion.cache_dir` when set (see `build_family`)."""
    from transformers import CLIPTextModel

    return build_family(cfg, DiffusionLikelihood, [("text_encoder", "tokenizer", CLIPTextModel)], use_cache, unet)
