"""Diffusion-DPO and Flow-DPO likelihoods, composed from small parts (UNet families SD1.5 / SD2 /
SDXL, flow transformers SD3 / FLUX, audio; the family-specific parts live in `mmalign/families/`).

Per pair, ONE noise level and ONE noise ε are drawn and shared by the chosen and the rejected
image, under the policy and the reference (Wallace et al., METHODS.md §2):

    UNet (ELBO):   t ~ U{0..T-1},  x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε,
                   target = ε (epsilon) | v = √ᾱ_t ε - √(1-ᾱ_t) x0 (v_prediction) | x0 (sample)
    flow matching: σ = shift(sigmoid(N(0, 1))),  x_t = (1-σ) x0 + σ ε,  target v = ε - x0
    mse = mean over every non-batch dim of (pred_θ(x_t, t, c) - target)²,   logp = -0.5 · mse

The official loss -log σ(-0.5·β·[(mse_θ(w) - mse_θ(l)) - (mse_ref(w) - mse_ref(l))]) is then
exactly the common `dpo` loss -log σ(β d) with the SAME β as the paper (5000 for SD1.5 and
SDXL). The diffusers research script's β 2500 (no 0.5) equals our 5000.

`DiffusionLikelihood` holds four parts and no family knowledge:
- an objective (`ElboObjective` here, `FlowObjective` in flow.py): the noise level's draw and
  (x_t, target) from (x0, ε, level);
- a latent source: images through the live VAE (`ImageLatents`), clips' log-mels through it
  (audio.py `MelLatents`), or a cache (diffusion_cache.py `CachedLatents`);
- a conditioning source: the family's live text encoders (text.py `TextConditioning` around the family's
  `PromptEncoder`), per-prompt encoding (audio), or a cache;
- the family's denoiser call (`Denoiser`): the model's keyword arguments, extra per-item
  conditioning (SDXL's add_time_ids), latent packing (FLUX).

Data: pair records {"prompt", "chosen", "rejected"} whose outputs are images (a path relative
to the data file's folder, bytes, or {"bytes", "path"}). `collate` is deterministic (resize the
shortest side to `diffusion.resolution`); every random choice (crop offset, flip, caption
dropout, t, ε, the VAE latent sample) is made in `draw` from each pair's own generator, so the
policy and the reference see the same draw and a resumed run repeats it exactly. Randomness is
drawn in a fixed order whatever the options (flip, crop, dropout, t, ε, latent), so switching
flips on does not change t or ε.

Null prompt: dropped captions become `encode("")` (the official Diffusion-DPO training). The
SDXL pipeline's `force_zeros_for_empty_prompt` instead feeds ZEROS for an empty negative
prompt at sampling time; `diffusion.null_prompt: zeros` trains with zeros to match that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from mmalign.data.media import load_image
from mmalign.data.preference import batch_fields, data_folder, flatten
from mmalign.families import Family
from mmalign.layout import batch_slots, item_slots, output_fields
from mmalign.modalities.text import TextConditioning
from mmalign.seeds import mix_seed
from mmalign.types import Draw, LogpOutput, PreferenceBatch


# -- pure helpers ------------------------------------------------------------------
def group_index(kind: str, num_items: int, num_records: int) -> Tensor:
    """(N,) group of each item: items of a group share t, ε, crop, flip and caption dropout.

    pair: chosen i and rejected i (rows i and B+i) form group i; ranked: the K items of a
    list; unpaired: every item alone (Diffusion-KTO). The item order is `mmalign.layout`'s."""
    return torch.tensor([i for i, _ in item_slots(kind, [num_items // num_records] * num_records)])


def example_generators(index: Tensor, generator: torch.Generator | None) -> list[torch.Generator | None]:
    """One generator per example (group), seeded by the step generator's seed and the example's
    row in the data (`batch.index`): a pair's t, ε, flip, crop, dropout and latent sample do not
    depend on the process, micro-batch or batch position it lands in, so 2 processes draw what
    1 process draws. No generator: the global RNG for all."""
    if generator is None:
        return [None] * len(index)
    base = generator.initial_seed()
    return [torch.Generator().manual_seed(mix_seed(base, row, offset=17)) for row in index.tolist()]


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


def crop_offsets(sizes: Tensor, resolution: int | Tensor, fraction: Tensor | None) -> Tensor:
    """Top-left (N, 2) of a resolution×resolution crop (or, `resolution` a (2,) tensor, an h×w crop)
    of images of `sizes` (N, 2) = (h, w).

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


def _output_names(kind: str, records: list[dict[str, Any]]) -> list[str]:
    """"row R, field" of every flattened item (R: the dataset row, plus the record's `source`
    such as a Pick-a-Pic shard:row when it has one), for error messages."""
    rows = [f"{r.get('_index', i)}" + (f" ({r['source']})" if r.get("source") else "") for i, r in enumerate(records)]
    return [f"row {rows[i]}, {output_fields(records[i], kind)[j]}" for i, j in batch_slots(records, kind)]


def sample_latents(mean: Tensor, std: Tensor, eta: Tensor, shift: float | None, scale: float) -> Tensor:
    """(mean + std · η - shift_factor) · scaling_factor, all (N, C, h, w) float32."""
    latents = mean + std * eta.to(mean.device)
    if shift is not None:
        latents = latents - shift
    return latents * scale


def mse_logps(pred: Tensor, target: Tensor) -> LogpOutput:
    """logps (N,) = -0.5 · mse, mse = mean over every non-batch dim of (pred - target)², float32;
    diagnostics {"mse": (N,)}."""
    mse = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    return LogpOutput(logps=-0.5 * mse, diagnostics={"mse": mse})


def vae_latent_shape(vae_config: Any, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of one latent: h = w = resolution / 2^(number of VAE blocks - 1)."""
    side = resolution // 2 ** (len(vae_config.block_out_channels) - 1)
    return (vae_config.latent_channels, side, side)


@torch.no_grad()
def vae_posterior(vae: Any, pixels: Tensor, batch_size: int = 0) -> tuple[Tensor, Tensor]:
    """The VAE's posterior of pixels (N, ...): mean, std (N, C, h, w) float32, unscaled. The VAE
    runs in its own dtype with autocast OFF (no fp16 NaN latents), in chunks of `batch_size`
    items (0: all at once)."""
    step = batch_size or pixels.shape[0]
    means, stds = [], []
    with torch.autocast(pixels.device.type, enabled=False):
        for start in range(0, pixels.shape[0], step):
            dist = vae.encode(pixels[start : start + step].to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


# -- the parts ---------------------------------------------------------------------------
class ElboObjective:
    """The UNet ELBO's noise level and inputs: t ~ U{0..T-1}; x_t = scheduler.add_noise(x0, ε, t);
    target ε, v or x0 by `prediction_type` (`diffusion.prediction_type`, else the scheduler's)."""

    def __init__(self, scheduler: Any, prediction_type: str = "") -> None:
        self.scheduler = scheduler
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def draw_time(self, generator: torch.Generator | None) -> Tensor:
        """(1,) timestep of one group (long), one call to the group's generator."""
        return torch.randint(0, self.num_train_timesteps, (1,), generator=generator)

    def time_values(self, times: Tensor, device: torch.device) -> dict[str, Tensor]:
        """The draw's values of the per-item (N,) times: {"timesteps"}."""
        return {"timesteps": times.to(device)}

    def noisy_and_target(self, latents: Tensor, noise: Tensor, values: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(x_t, target), both (N, C, h, w)."""
        t = values["timesteps"]
        noisy = self.scheduler.add_noise(latents, noise, t)
        return noisy, prediction_target(self.scheduler, self.prediction_type, latents, noise, t)

    def schedule(self, num_steps: int) -> Tensor:
        """(S,) long timesteps of an S-step sampling schedule of this scheduler's config (its
        `timestep_spacing`; e.g. DDPM "leading", T 1000, S 10 -> 900, 800, ..., 0)."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler.timesteps.long()

    def flow_view(self, noisy: Tensor, latents: Tensor, pred: Tensor,
                  values: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The UNet's x_t = a·x0 + b·ε (a = √ᾱ_t, b = √(1-ᾱ_t)) and prediction in the flow convention
        (DiffusionNFT): x̂0, ε̂ from the ε / v / x0 prediction, then s = a + b, t = b/s,
        x_t^flow = x_t/s = (1-t)·x0 + t·ε and v̂ = ε̂ - x̂0, so that x_t^flow - t·v̂ = x̂0 exactly.
        Returns (x_t^flow, t (N,), v̂, x0), float32."""
        alphas = self.scheduler.alphas_cumprod.to(noisy.device)[values["timesteps"]].float()
        a, b = alphas.sqrt(), (1 - alphas).sqrt()
        noisy, pred = noisy.float(), pred.float()
        shape = (-1, *[1] * (noisy.ndim - 1))
        av, bv = a.view(shape), b.view(shape)
        if self.prediction_type == "epsilon":
            eps = pred
            x0 = (noisy - bv * eps) / av
        elif self.prediction_type == "v_prediction":
            x0, eps = av * noisy - bv * pred, bv * noisy + av * pred
        else:  # sample
            x0 = pred
            eps = (noisy - av * x0) / bv
        s = a + b
        return noisy / s.view(shape), b / s, eps - x0, latents.float()


class Denoiser(Protocol):
    """A family's denoiser call (e.g. `families.sdxl.SDXLUNet`)."""

    def extra_conditioning(self, inputs: dict[str, Any], crop_top_left: Tensor) -> dict[str, Tensor]:
        """Per-item conditioning made in the draw from the batch and the crop (SDXL: time_ids)."""
        ...

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        """The model's output at x_t (N, C, h, w) in the layout of `layout(target)` (any float
        dtype: `mse_logps` compares in float32)."""
        ...

    def layout(self, target: Tensor) -> Tensor:
        """The target in the prediction's layout (FLUX: packed 2×2); identity for most."""
        ...


class UNetCall:
    """The plain UNet call `unet(x_t, t, encoder_hidden_states=c)` (SD1.5 / SD2); families with
    more conditioning override `kwargs` (SDXL, audio). Beyond `Denoiser`, a UNet call gives
    `kwargs` and `sampling_conditioning`, which the step likelihood (SPO) uses for its guided
    UNet calls on sampled latents."""

    def kwargs(self, values: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Any]:
        """Conditioning keyword arguments of the UNet call."""
        return {"encoder_hidden_states": values["encoder_hidden_states"].to(dtype)}

    def extra_conditioning(self, inputs: dict[str, Any], crop_top_left: Tensor) -> dict[str, Tensor]:
        return {}

    def latent_channels(self, config: Any) -> int:
        """Latent channels the denoiser takes (its config's in_channels; FLUX packs 4 per token)."""
        return int(config.in_channels)

    def sampling_conditioning(self, n: int, resolution: int, device: torch.device) -> dict[str, Tensor]:
        """Extra conditioning of n generated images (no crop; SDXL's time_ids); none here."""
        return {}

    def predict(self, model: torch.nn.Module, noisy: Tensor, values: dict[str, Tensor]) -> Tensor:
        dtype = next(model.parameters()).dtype
        return model(noisy.to(dtype), values["timesteps"], **self.kwargs(values, dtype), return_dict=False)[0]

    def layout(self, target: Tensor) -> Tensor:
        return target


class ImageLatents:
    """Images -> VAE latents, live: collate loads and resizes, the draw crops, flips and encodes.

    vae: frozen AutoencoderKL (kept in `settings.vae_dtype`, run outside autocast).
    roots: folders that relative image paths of records without their own `_root` are resolved
    against (`data_roots`)."""

    items_key = "pixel_values"  # the batch input whose rows are the items

    def __init__(self, vae: Any, settings: Any, roots: Sequence[str | Path] = ()) -> None:
        self.vae = vae.requires_grad_(False).eval()
        self.settings = settings
        self.roots = [Path(r) for r in roots]

    def to(self, device: torch.device | str) -> None:
        self.vae.to(device)

    def image(self, value: Any, where: str, root: str | None = None) -> Any:
        """`root`: the record's own data folder (`_root`), else the data folders."""
        return load_image(value, where, root or self.roots)

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """pixel_values (N, 3, Hp, Wp) in [-1, 1], each image resized (shortest side = resolution)
        and zero-padded to the batch's largest size; sizes (N, 2) its resized (h, w);
        original_sizes (N, 2) (h, w) as loaded."""
        res = self.settings.resolution
        images, sizes, originals = [], [], []
        for item, where in zip(flatten(records, kind), _output_names(kind, records)):
            image = self.image(item["response"], where, item.get("_root"))
            originals.append((image.height, image.width))
            image = resize_shortest(image, res)
            sizes.append((image.height, image.width))
            images.append(to_pixels(image))
        hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
        pixels = torch.zeros(len(images), 3, hp, wp)
        for row, image in enumerate(images):
            pixels[row, :, : image.shape[1], : image.shape[2]] = image
        return {"pixel_values": pixels, "sizes": torch.tensor(sizes), "original_sizes": torch.tensor(originals)}

    def augment(self, inputs: dict[str, Any], flip: Tensor, crop_fraction: Tensor) -> tuple[Tensor, Tensor]:
        """Crop and flip per item with its group's choices.

        flip (N,) bool; crop_fraction (N, 2). Returns pixels (N, 3, res, res) and the crop
        top-left (N, 2) in the coordinates of the (flipped) resized image, as SDXL's
        `crops_coords_top_left` (a flipped crop's left is w - left - res)."""
        res = self.settings.resolution
        sizes = inputs["sizes"].cpu()
        offsets = crop_offsets(sizes, res, crop_fraction if self.settings.crop == "random" else None)
        crops = []
        for i, (top, left) in enumerate(offsets.tolist()):
            crop = inputs["pixel_values"][i, :, top : top + res, left : left + res]
            crops.append(crop.flip(-1) if flip[i] else crop)
        mirrored_left = torch.where(flip, sizes[:, 1] - offsets[:, 1] - res, offsets[:, 1])
        return torch.stack(crops), torch.stack([offsets[:, 0], mirrored_left], dim=1)

    def latent_shape(self) -> tuple[int, int, int]:
        return vae_latent_shape(self.vae.config, self.settings.resolution)

    def latent_scaling(self) -> tuple[float | None, float]:
        """(shift_factor or None, scaling_factor) of the VAE's latent space."""
        return getattr(self.vae.config, "shift_factor", None), float(self.vae.config.scaling_factor)

    def latent_dist(self, pixels: Tensor, batch_size: int = 0) -> tuple[Tensor, Tensor]:
        """The VAE's posterior mean, std (N, C, h, w) float32 of pixels (N, 3, res, res)
        (`vae_posterior`; batch_size 0: `diffusion.vae_batch_size`)."""
        return vae_posterior(self.vae, pixels, batch_size or self.settings.vae_batch_size)

    def sample(self, inputs: dict[str, Any], groups: Tensor, flip: Tensor, crop_fraction: Tensor,
               eta: Callable[[Sequence[int]], Tensor]) -> tuple[Tensor, Tensor]:
        """x0 (N, C, h, w) float32 and the crop top-left (N, 2): crop and flip the pixels with each
        item's group choices, encode, sample mean + std · η with η = `eta(shape)`."""
        pixels, crop_top_left = self.augment(inputs, flip[groups], crop_fraction[groups])
        mean, std = self.latent_dist(pixels)
        return sample_latents(mean, std, eta(mean.shape), *self.latent_scaling()), crop_top_left

    # -- what `mmalign cache` stores (cache_writer.py) -----------------------------------------
    def cache_settings(self, cfg: Any) -> dict[str, Any]:
        """Plan settings this source adds (none for images)."""
        return {}

    def cache_item(self, value: Any, where: str, fraction: Tensor | None,
                   root: str | None = None) -> tuple[Tensor, list[int]]:
        """Load, resize (shortest side = resolution) and crop one image as the uncached draw does.

        Returns pixels (3, res, res) in [-1, 1] and [orig_h, orig_w, top, left, top, left_flipped],
        left_flipped = resized_w - left - res (the crop's left in the mirrored image)."""
        res = self.settings.resolution
        image = self.image(value, where, root)
        original = [image.height, image.width]
        image = resize_shortest(image, res)
        top, left = crop_offsets(torch.tensor([[image.height, image.width]]), res, fraction)[0].tolist()
        pixels = to_pixels(image)[:, top : top + res, left : left + res]
        return pixels, [*original, top, left, top, image.width - left - res]


# -- the likelihood ----------------------------------------------------------------------
class DiffusionLikelihood:
    """Implicit log-likelihood -0.5·mse of an output under a denoiser, from its four parts
    (module docstring). `family`: the `Family` descriptor (validation reads its pipeline);
    `settings`: the `diffusion` config section."""

    deterministic = False  # the noise level, ε and the latent sample change every step

    def __init__(self, family: Family, objective: Any, latents: Any, conditioning: Any, denoiser: Denoiser,
                 settings: Any) -> None:
        self.family, self.objective, self.settings = family, objective, settings
        self.latents, self.conditioning, self.denoiser = latents, conditioning, denoiser

    # frozen parts, for pipelines built in memory (validation, SPO sampling); None / [] from a cache
    @property
    def vae(self) -> Any:
        return self.latents.vae

    @property
    def text_encoders(self) -> list[Any]:
        return self.conditioning.text_encoders

    @property
    def tokenizers(self) -> list[Any]:
        return self.conditioning.tokenizers

    @property
    def scheduler(self) -> Any:
        return self.objective.scheduler

    @property
    def prediction_type(self) -> str:
        return self.objective.prediction_type

    def to(self, device: torch.device | str) -> "DiffusionLikelihood":
        """Move the frozen VAE and text encoders (dtypes unchanged)."""
        self.latents.to(device)
        self.conditioning.to(device)
        return self

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Conditioning (n, ...) of plain strings through the live text encoders, e.g.
        `encode_text([""])` is the null prompt (a cached likelihood has none: an error)."""
        return self.conditioning.encode_text(prompts)

    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        """records -> batch of N items (2B for pairs: chosen rows first, then rejected): the latent
        source's inputs (pixels, log-mels or cached distributions) and the conditioning's."""
        inputs = {**self.latents.collate(records, kind), **self.conditioning.collate(records, kind)}
        return batch_fields(records, kind, inputs)

    def draw_choices(self, kind: str, num_items: int,
                     generators: list[torch.Generator | None]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The per-group random choices, each group from its own generator (`example_generators`)
        in the fixed order every draw uses: flip, crop fraction (2 values), caption dropout, then
        the objective's noise level (timestep, or σ); `draw` then takes ε and the latent sample of
        each of the group's items. Returns groups (N,), flip (G,) bool, crop_fraction (G, 2),
        dropped (G,) bool, times (G,)."""
        groups = group_index(kind, num_items, len(generators))
        u = torch.stack([torch.rand(4, generator=g) for g in generators])  # (G, 4)
        times = torch.cat([self.objective.draw_time(g) for g in generators])
        flip = (u[:, 0] < 0.5) & self.settings.random_flip
        return groups, flip, u[:, 1:3], u[:, 3] < self.settings.caption_dropout, times

    def draw(self, batch: PreferenceBatch, generator: torch.Generator | None = None) -> Draw:
        """Per group (pair) g: flip, crop fraction, caption dropout, the noise level, ε_g; per item:
        the latent sample, all from the group's own generator (`example_generators`: the step's
        seed + the example's data row). Values (N = 2B rows for pairs, chosen then rejected):
        latents, noise (N, C, h, w) float32; timesteps (N,) [sigmas (N,)]; caption_dropped (N,)
        bool; the conditioning tensors (encoder_hidden_states (N, L, D), ...); the denoiser's
        extra conditioning."""
        inputs = batch.inputs
        generators = example_generators(batch.index, generator)
        n = inputs[self.latents.items_key].shape[0]
        groups, flip, crop_fraction, dropped, times = self.draw_choices(batch.kind, n, generators)
        noise = torch.stack([torch.randn(self.latents.latent_shape(), generator=g) for g in generators])
        latents, crop_top_left = self.latents.sample(inputs, groups, flip, crop_fraction,
                                                     lambda shape: item_normals(shape, groups, generators))
        values = {"latents": latents, "noise": noise[groups].to(latents.device),
                  **self.objective.time_values(times[groups], latents.device), "caption_dropped": dropped[groups]}
        values.update(self.conditioning.per_item(inputs, groups, dropped))
        values.update(self.denoiser.extra_conditioning(inputs, crop_top_left))
        return Draw(values)

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw) -> LogpOutput:
        """logps (N,) = -0.5 · mse of the denoiser's prediction at x_t against the objective's
        target; diagnostics {"mse": (N,)} (float32)."""
        v = draw.values
        noisy, target = self.objective.noisy_and_target(v["latents"], v["noise"], v)
        return mse_logps(self.denoiser.predict(model, noisy, v), self.denoiser.layout(target))

    def flow_schedule(self, num_steps: int) -> Tensor:
        """(S,) noise levels of an S-step sampling schedule (the objective's `schedule`)."""
        return self.objective.schedule(num_steps)

    def at_times(self, draw: Draw, times: Tensor, noise: Tensor) -> Draw:
        """The draw with per-item noise levels `times` (N,) and noise (N, C, h, w) in place of its own."""
        device = draw.values["latents"].device
        values = dict(draw.values, noise=noise.to(device))
        values.update(self.objective.time_values(times, device))
        return Draw(values)

    def flow_prediction(self, model: torch.nn.Module, draw: Draw) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t (N,), v̂, x0) of the draw in the flow convention x_t = (1-t)·x0 + t·ε, v̂ the
        model's velocity ε - x0 (the objective's `flow_view`: flow families as they are, UNet
        predictions converted), all in the denoiser's layout (FLUX: packed), float32. DiffusionNFT's
        input (mmalign/train/nft.py)."""
        v = draw.values
        noisy, _ = self.objective.noisy_and_target(v["latents"], v["noise"], v)
        pred = self.denoiser.predict(model, noisy, v)
        layout = self.denoiser.layout
        return self.objective.flow_view(layout(noisy), layout(v["latents"]), pred, v)

    def validate(self, model: torch.nn.Module, step: int, folder: str | Path) -> dict[str, float]:
        """The trainer's `train.validate_every` hook: a PNG grid of the configured prompts × seeds
        sampled with `model` through the family's pipeline (`validation.validate_images`)."""
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


def image_likelihood(cfg: Any, family: Family, parts: dict[str, Any], encoder: Any, denoiser: Denoiser,
                     objective: Callable[[Any, tuple[int, int, int]], Any] | None = None,
                     latents: Any = None) -> DiffusionLikelihood:
    """A live image likelihood: `TextConditioning` through the family's encoder; `latents` the
    family's latent source (default `ImageLatents` through the loaded VAE); objective(scheduler,
    latent_shape) the family's (flow families: the shift of those latents' size), default the ELBO
    — the same contract as the cached path (`diffusion_cache.build_cached`)."""
    d = cfg.diffusion
    latents = latents or ImageLatents(parts["vae"], d, data_roots(cfg))
    scheduler = parts["scheduler"]
    chosen = objective(scheduler, latents.latent_shape()) if objective else ElboObjective(scheduler, d.prediction_type)
    return DiffusionLikelihood(family, chosen, latents, TextConditioning(encoder, d.null_prompt), denoiser, d)
