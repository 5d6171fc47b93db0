"""Flow matching for diffusers rectified-flow transformers (SD3 / SD3.5, FLUX; their families in
`mmalign/families/sd3.py`, `flux.py`), METHODS.md §2 "Flow matching". Per pair, ONE σ and ONE ε
are shared by the chosen and the rejected image, under the policy and the reference:

    u ~ logit-normal(0, 1) = sigmoid(N(0, 1))           (diffusers' compute_density_for_timestep_sampling)
    σ = s·u / (1 + (s - 1)·u)                            (the scheduler's shift s)
    x_t = (1 - σ)·x0 + σ·ε,   target v = ε - x0,   model timestep = σ·1000
    mse = mean over every non-batch dim of (v_θ(x_t, σ, c) - v)²,   logp = -0.5·mse

so the common `dpo` loss -log σ(β d) equals Flow-DPO's -log σ(-β/2·[(mse_θ(w) - mse_θ(l)) -
(mse_ref(w) - mse_ref(l))]) with β ≈ 100 for SD3.5-Medium (FLUX users needed ≈ 2000).

Shift s: SD3 uses the scheduler config's `shift` (3.0). FLUX (`use_dynamic_shifting`) uses the
pipeline's resolution-dependent shift: mu = calculate_shift(image_seq_len) linear between
(base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), s = exp(mu) (the
scheduler's "exponential" time_shift; "linear" gives s = mu). σ is continuous, as in the SD3
paper; diffusers' training scripts round u to the scheduler's 1000-step grid instead.

The rest of the likelihood (latents, augmentation, caption dropout and the draw order: flip,
crop, dropout, u, ε, latent sample) is `DiffusionLikelihood`'s; `FlowObjective` takes the ELBO
objective's place, u takes t's.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor


# -- pure helpers ------------------------------------------------------------------
def shift_sigmas(u: Tensor, shift: float) -> Tensor:
    """σ = shift·u / (1 + (shift - 1)·u), elementwise; u in (0, 1). E.g. u 0.5, shift 3 -> 0.75."""
    return shift * u / (1 + (shift - 1) * u)


def flow_shift(scheduler_config: Any, image_seq_len: int) -> float:
    """The scheduler's shift s for images of `image_seq_len` transformer tokens.

    Static (SD3): config.shift. Dynamic (FLUX): mu = m·image_seq_len + b with m = (max_shift -
    base_shift) / (max_image_seq_len - base_image_seq_len), b = base_shift - m·base_image_seq_len
    (diffusers' calculate_shift); s = exp(mu) ("exponential" time shift) or mu ("linear")."""
    c = scheduler_config
    if not c.get("use_dynamic_shifting", False):
        return float(c.get("shift", 1.0))
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    mu = image_seq_len * m + (base_shift - m * base_len)
    return math.exp(mu) if c.get("time_shift_type", "exponential") == "exponential" else mu


def pack_latents(latents: Tensor) -> Tensor:
    """FLUX 2×2 packing: (N, C, h, w) -> (N, h/2 · w/2, 4C), as FluxPipeline._pack_latents."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def latent_image_ids(h: int, w: int) -> Tensor:
    """FLUX image position ids (h/2 · w/2, 3): rows (0, i, j) of the packed grid, row-major."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


# -- the objective ----------------------------------------------------------------------
class FlowObjective:
    """The flow-matching noise level and inputs (module docstring). shift: the scheduler's shift s
    for this resolution (`flow_shift`); prediction_type: the `diffusion.prediction_type` setting,
    which must be empty (flow transformers predict the velocity ε - x0)."""

    def __init__(self, scheduler: Any, shift: float, prediction_type: str = "") -> None:
        if prediction_type:
            raise ValueError(f"diffusion.prediction_type '{prediction_type}': flow transformers "
                             "predict the velocity ε - x0; leave it empty")
        self.scheduler, self.shift, self.prediction_type = scheduler, shift, "flow"
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def draw_time(self, generator: torch.Generator | None) -> Tensor:
        """(1,) σ = shift(sigmoid(z)), z ~ N(0, 1): logit-normal u through the scheduler's shift."""
        return shift_sigmas(torch.sigmoid(torch.randn(1, generator=generator)), self.shift)

    def time_values(self, times: Tensor, device: torch.device) -> dict[str, Tensor]:
        """{"sigmas": (N,) float32, "timesteps": (N,) σ·1000} of the per-item σ."""
        return {"sigmas": times.to(device), "timesteps": (times * self.num_train_timesteps).to(device)}

    def noisy_and_target(self, latents: Tensor, noise: Tensor, values: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """x_t = (1 - σ)·x0 + σ·ε and v = ε - x0, (N, C, h, w) float32."""
        latents, noise = latents.float(), noise.float()
        sigma = values["sigmas"].float().view(-1, *[1] * (latents.ndim - 1))
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def schedule(self, num_steps: int) -> Tensor:
        """(S,) σ of an S-step sampling schedule, as FlowMatchEulerDiscreteScheduler.set_timesteps
        (and FLUX's pipeline) give it: shift(linspace(1, 1/S, S)); e.g. S 2, shift 3 -> [1, 0.75]."""
        return shift_sigmas(torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64), self.shift).float()

    def flow_view(self, noisy: Tensor, latents: Tensor, pred: Tensor,
                  values: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t (N,), v̂, x0) in the flow convention (DiffusionNFT): the prediction IS v̂ and t = σ."""
        return noisy.float(), values["sigmas"].float(), pred.float(), latents.float()


def t5_hidden(encoder: Any, ids: Tensor) -> Tensor:
    """T5 last hidden state (n, L, D) float32, autocast off."""
    ids = ids.to(encoder.device)
    with torch.autocast(ids.device.type, enabled=False):
        return encoder(ids)[0].float()


def flow_objective(prediction_type: str, patch: int) -> Callable[[Any, tuple[int, int, int]], FlowObjective]:
    """objective(scheduler, latent_shape) of a flow family whose transformer cuts latents (C, h, w)
    into p×p patches: the shift of its (h/p)·(w/p) image tokens (SD3: the config's patch_size;
    FLUX, Z-Image: 2×2 packing). A side that p does not divide is a ConfigError."""
    def make(scheduler: Any, shape: tuple[int, int, int]) -> FlowObjective:
        from mmalign.errors import ConfigError

        _, h, w = shape
        if h % patch or w % patch:
            raise ConfigError(f"diffusion.resolution: latents {h}x{w} are not divisible into {patch}x{patch} patches; "
                              "choose a resolution that is a multiple of the VAE factor times the patch size")
        return FlowObjective(scheduler, flow_shift(scheduler.config, (h // patch) * (w // patch)), prediction_type)

    return make
