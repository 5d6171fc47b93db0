"""SDE sampling with per-step log-probabilities for flow transformers (Flow-GRPO, DanceGRPO;
METHODS.md C.1, C.2), and the step likelihood that scores sampled transitions for GRPO.

Flow convention x_σ = (1 - σ)·x0 + σ·ε, velocity v = ε - x0, σ runs from 1 down to 0; one step
goes σ -> σ' (dt = σ' - σ < 0); v is the (CFG-guided) predicted velocity; all float32.

    sde (Flow-GRPO, noise level a):
        std_t = a·sqrt(σ / (1 - σ))        (at σ = 1 the denominator is 1 - sigmas[1], as the code)
        μ = x + [v + std_t²/(2σ)·(x + (1 - σ)·v)]·dt,   x' = μ + std_t·sqrt(-dt)·ε
        logp = mean_dims[-(x' - μ)²/(2 s²) - log s - log√(2π)],   s = std_t·sqrt(-dt)
    cps (Coefficients-Preserving Sampling, 2509.05952):
        s = σ'·sin(a·π/2),  x̂0 = x - σv,  x̂1 = x + (1 - σ)v,  μ = (1 - σ')·x̂0 + sqrt(σ'² - s²)·x̂1
        logp = mean_dims[-(x' - μ)²]     (constants and the 1/(2s²) scale dropped, as the code)
    dance (DanceGRPO, constant η = a):
        μ = x + [v + a²/(2σ)·(x + (1 - σ)·v)]·dt,   s = a·sqrt(σ - σ'),   logp as sde

a = 0 gives the Euler ODE step μ = x + v·dt with s = 0 (no density: only a > 0 steps are
trained). `kl_scale` is what Flow-GRPO's KL divides by (its `std_dev_t`: std_t for sde, s for cps;
dance has no KL in its code: a). Hand values (tests): a = 0.7, σ = 0.5, σ' = 0.4, x = v = 1:
std_t 0.7, μ 0.8265, s 0.22136, logp(x' = μ) 0.58903; dance a = 0.3: μ 0.8865, s 0.09487.

Records of a trained step (built by `grpo_source.py`): {"prompt", "x_t", "completion" (x_{t-1}),
"t" (σ), "t_next" (σ'), "noise_level", "old_logp", "advantage", ...}; a batch needs no draw.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import Tensor

from mmalign.modalities.step import gaussian_logp
from mmalign.types import Draw, LogpOutput, PreferenceBatch

SDE_TYPES = ("sde", "cps", "dance")


def _col(values: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or (N,) -> (N, 1, ..., 1) float32 broadcastable against `like` (N, ...)."""
    t = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    return t.reshape(-1, *[1] * (like.ndim - 1)) if t.ndim else t


def flow_sde_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
                  noise_level: Tensor | float, sde_type: str = "sde",
                  sigma_max: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(μ (N, ...), s (N,) the std of x' around μ, kl_scale (N,)) of one step σ -> σ' (module
    docstring). sigma, sigma_next, noise_level: scalars or (N,); sigma_max: the schedule's second
    sigma (σ = 1 uses 1 - sigma_max in std_t's denominator)."""
    x, v = x.float(), v.float()
    n = x.shape[0]
    s_, sn_, a_ = (torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n)
                   for t in (sigma, sigma_next, noise_level))
    sig, sig_next, a = _col(s_, x), _col(sn_, x), _col(a_, x)
    dt = sig_next - sig
    if sde_type == "sde":
        std_t = a_ * (s_ / (1 - torch.where(s_ >= 1, torch.full_like(s_, sigma_max), s_))).sqrt()
        c = _col(std_t, x)
        mean = x + (v + c**2 / (2 * sig) * (x + (1 - sig) * v)) * dt
        return mean, std_t * (s_ - sn_).clamp(min=0).sqrt(), std_t
    if sde_type == "dance":
        mean = x + (v + a**2 / (2 * sig) * (x + (1 - sig) * v)) * dt
        return mean, a_ * (s_ - sn_).clamp(min=0).sqrt(), a_
    if sde_type == "cps":
        std = sn_ * torch.sin(a_ * math.pi / 2)
        x0, x1 = x - sig * v, x + (1 - sig) * v
        mean = (1 - sig_next) * x0 + (sig_next**2 - _col(std, x) ** 2).clamp(min=0).sqrt() * x1
        return mean, std, std
    raise ValueError(f"sde_type '{sde_type}' is not one of {', '.join(SDE_TYPES)}")


def flow_step_logp(x_next: Tensor, mean: Tensor, std: Tensor, sde_type: str = "sde") -> Tensor:
    """(N,) log-prob of x' under the step's Gaussian: sde / dance the mean-over-dims Gaussian
    log-density (std (N,) > 0), cps mean_dims[-(x' - μ)²] (its code drops the constants)."""
    if sde_type == "cps":
        return -((x_next.float() - mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return gaussian_logp(x_next, mean, std)


def flow_sigmas(scheduler: Any, num_steps: int, shift: float) -> Tensor:
    """The sampling schedule σ_0 = 1 > ... > σ_S = 0 (S + 1,) of the family's scheduler, as its
    pipeline sets it (a dynamic-shift scheduler gets mu = log(shift)); the scheduler is copied."""
    s = copy.deepcopy(scheduler)
    kwargs = {"mu": math.log(shift)} if s.config.get("use_dynamic_shifting", False) else {}
    s.set_timesteps(num_steps, **kwargs)
    return s.sigmas.float().cpu()


def unpack_latents(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `flow.pack_latents`: (N, h/2·w/2, 4C) -> (N, C, h, w) of latent shape (C, h, w)."""
    c, h, w = shape
    n = packed.shape[0]
    return packed.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


class FlowStepLikelihood:
    """Log-prob of sampled transitions x_t -> x_{t-1} under a flow transformer with CFG (GRPO).

    base: the flow family's `DiffusionLikelihood` (its text encoder, VAE, transformer call).
    settings: the `grpo` config section (sde_type, noise_level, guidance, num_steps).
    unpack: maps the transformer's output back to latents (FLUX: `unpack_latents`), else None.
    """

    deterministic: bool = False

    def __init__(self, base: Any, settings: Any, unpack: Callable[[Tensor, tuple[int, ...]], Tensor] | None = None):
        self.base, self.settings, self.unpack = base, settings, unpack
        self.sigmas = flow_sigmas(base.scheduler, settings.num_steps, base.objective.shift)
        self.sigma_max = float(self.sigmas[1])
        self._null: dict[str, Tensor] | None = None

    @property
    def vae(self) -> Any:
        return self.base.vae

    def to(self, device: torch.device | str) -> "FlowStepLikelihood":
        self.base.to(device)
        self._null = None
        return self

    def validate(self, model: torch.nn.Module, step: int, folder: Any) -> dict[str, float]:
        return self.base.validate(model, step, folder)

    # -- the sampler's view (grpo_source.TrajectoryLikelihood) ------------------------------------
    def steps(self) -> list[tuple[float, float]]:
        """(σ, σ') of each of the S sampling steps."""
        s = self.sigmas.tolist()
        return list(zip(s[:-1], s[1:]))

    def latent_shape(self) -> tuple[int, ...]:
        return self.base.latents.latent_shape()

    def init_sigma(self) -> float:
        return 1.0

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        return self.base.conditioning.encoder.tokenize(prompts)

    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.base.conditioning.encoder.encode(ids)

    def null_conditioning(self) -> dict[str, Tensor]:
        """(1, ...) negative conditioning: encode("") or zeros (`diffusion.null_prompt`), cached."""
        if self._null is None:
            cond = self.encode(self.tokenize([""]))
            if self.base.settings.null_prompt == "zeros":
                cond = {k: torch.zeros_like(v) for k, v in cond.items()}
            self._null = cond
        return self._null

    def guided(self, model: torch.nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """u + w (c - u) of the velocity at x (N, C, h, w), σ = t (N,): one call on [null; prompt]."""
        w, n = self.settings.guidance, x.shape[0]
        if w != 1.0:
            null = {k: v.to(x.device).expand(n, *v.shape[1:]) for k, v in self.null_conditioning().items()}
            cond = {k: torch.cat([null[k], cond[k].to(x.device)]) for k in cond}
            x, t = torch.cat([x, x]), torch.cat([t, t])
        t = t.to(x.device, torch.float32)
        values = {**cond, "sigmas": t, "timesteps": t * self.base.objective.num_train_timesteps}
        out = self.base.denoiser.predict(model, x, values).float()
        if self.unpack is not None:
            out = self.unpack(out, tuple(x.shape[1:]))
        if w == 1.0:
            return out
        uncond, text = out.chunk(2)
        return uncond + w * (text - uncond)

    def transition(self, output: Tensor, x: Tensor, t: Tensor, t_next: Tensor,
                   noise_level: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(μ, s, kl_scale) of the step (`flow_sde_step` with the run's sde_type)."""
        return flow_sde_step(x, output, t, t_next, noise_level, self.settings.sde_type, self.sigma_max)

    def step_logp(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return flow_step_logp(x_next, mean, std, self.settings.sde_type)

    # -- the Likelihood contract ---------------------------------------------------------------
    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        from mmalign.modalities.grpo_source import collate_steps

        return collate_steps(self, records, kind)

    def draw(self, batch: PreferenceBatch, generator: torch.Generator | None = None) -> Draw:
        """Nothing to draw: the transitions carry their randomness."""
        return Draw()

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw | None = None) -> LogpOutput:
        from mmalign.modalities.grpo_source import step_logps

        return step_logps(self, model, batch)


__all__ = ["SDE_TYPES", "FlowStepLikelihood", "flow_sde_step", "flow_sigmas", "flow_step_logp",
           "unpack_latents"]
