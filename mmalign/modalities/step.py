"""Step-aware likelihood (SPO, D3PO; METHODS.md §2 "Step-aware"): the log-density of ONE sampler
transition x_t -> x_{t-1} under a diffusers UNet (SD1.5 / SD2 / SDXL) with classifier-free
guidance, as the sampler drew it.

    ε̂ = ε_θ(x_t, t, ∅) + w (ε_θ(x_t, t, c) - ε_θ(x_t, t, ∅))      (the guided output, as sampling)
    x̂0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t                                  (v / sample predictions converted)
    DDIM (η > 0):  σ_t² = η² (1-ᾱ_prev)/(1-ᾱ_t) (1 - ᾱ_t/ᾱ_prev)
                   μ = √ᾱ_prev x̂0 + √(1-ᾱ_prev-σ_t²) ε̂               (Song et al., eq. 12)
    DDPM:          μ = √ᾱ_prev β'_t/(1-ᾱ_t) x̂0 + √α'_t (1-ᾱ_prev)/(1-ᾱ_t) x_t,
                   σ_t² = (1-ᾱ_prev)/(1-ᾱ_t) β'_t (fixed_small) or β'_t (fixed_large),
                   α'_t = ᾱ_t/ᾱ_prev, β'_t = 1 - α'_t                  (Ho et al., eq. 6-7)
    logp = mean over every non-batch dim of log N(x_{t-1}; μ, σ_t²)

ᾱ_prev at the last step (prev < 0) is the scheduler's final value (DDIM's `final_alpha_cumprod`,
1 for DDPM). x̂0 is clipped when the scheduler config says `clip_sample`, exactly as the
schedulers' `step()` does, so μ + σ_t·noise equals `step(..., variance_noise=noise)` (tested).

The MEAN over dimensions, not the sum, follows the SPO/DDPO reference code: a sum over 4×64×64
latent dims makes log r thousands of times larger, the ratio clip of `spo_loss` saturates and
the gradient vanishes; β = 10 and clip 0.1 are tuned for the mean.

Records (one per pair, built by `step_sampler.py`): {"prompt", "timestep", "prev_timestep",
"chosen", "rejected"} with x_{t-1} tensors (C, h, w), and "x_t" (SPO: both candidates come from
the same x_t) or "chosen_x_t" / "rejected_x_t" (D3PO: two trajectories at the same t). A batch
needs no draw: every random choice was made when the transitions were sampled.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.data.preference import batch_fields, flatten
from mmalign.layout import batch_slots
from mmalign.types import Draw, LogpOutput, PreferenceBatch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# -- pure transition math ------------------------------------------------------------------
def _per_item(values: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) broadcastable against `like` (N, ...), float32."""
    return values.to(like.device, torch.float32).view(-1, *[1] * (like.ndim - 1))


def alphas_at(alphas_cumprod: Tensor, timesteps: Tensor, final_alpha: float) -> Tensor:
    """ᾱ at each timestep (N,), `final_alpha` where the timestep is < 0 (past the last step)."""
    table = alphas_cumprod.to(timesteps.device, torch.float32)
    return torch.where(timesteps >= 0, table[timesteps.clamp(min=0)], torch.full_like(table[:1], final_alpha))


def predict_x0_eps(output: Tensor, x_t: Tensor, alpha_t: Tensor, prediction_type: str,
                   clip_range: float | None) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from the model output at x_t; alpha_t (N,). x̂0 clipped to ±clip_range when given
    (ε̂ is NOT re-derived from the clipped x̂0, as diffusers' default use_clipped_model_output)."""
    a = _per_item(alpha_t, x_t)
    output, x_t = output.float(), x_t.float()
    if prediction_type == "epsilon":
        x0, eps = (x_t - (1 - a).sqrt() * output) / a.sqrt(), output
    elif prediction_type == "v_prediction":
        x0, eps = a.sqrt() * x_t - (1 - a).sqrt() * output, a.sqrt() * output + (1 - a).sqrt() * x_t
    elif prediction_type == "sample":
        x0, eps = output, (x_t - a.sqrt() * output) / (1 - a).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type '{prediction_type}' (epsilon, v_prediction, sample)")
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    return x0, eps


def ddim_transition(x0: Tensor, eps: Tensor, alpha_t: Tensor, alpha_prev: Tensor,
                    eta: float) -> tuple[Tensor, Tensor]:
    """DDIM (Song et al. 2021, eq. 12, 16): mean (N, ...) and std σ_t (N,) of x_{t-1}."""
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    ap = _per_item(alpha_prev, x0)
    direction = (1 - ap - _per_item(std, x0) ** 2).clamp(min=0).sqrt() * eps
    return ap.sqrt() * x0 + direction, std


def ddpm_transition(x0: Tensor, x_t: Tensor, alpha_t: Tensor, alpha_prev: Tensor, timesteps: Tensor,
                    variance_type: str = "fixed_small") -> tuple[Tensor, Tensor]:
    """DDPM posterior q(x_{t-1} | x_t, x̂0) (Ho et al. 2020, eq. 6-7): mean (N, ...) and std (N,);
    std is 0 at t = 0 (diffusers adds no noise there)."""
    current_alpha = alpha_t / alpha_prev
    current_beta = 1 - current_alpha
    coef_x0 = _per_item(alpha_prev.sqrt() * current_beta / (1 - alpha_t), x0)
    coef_xt = _per_item(current_alpha.sqrt() * (1 - alpha_prev) / (1 - alpha_t), x0)
    mean = coef_x0 * x0 + coef_xt * x_t.float()
    if variance_type == "fixed_small":
        variance = ((1 - alpha_prev) / (1 - alpha_t) * current_beta).clamp(min=1e-20)
    elif variance_type == "fixed_large":
        variance = current_beta
    else:
        raise ValueError(f"DDPM variance_type '{variance_type}' is not supported (fixed_small, fixed_large)")
    return mean, torch.where(timesteps.to(variance.device) > 0, variance.sqrt(), torch.zeros_like(variance))


def gaussian_logp(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean over every non-batch dim of log N(x; mean, std²), (N,) float32; std (N,) > 0."""
    s = _per_item(std, mean)
    log_density = -((x.float() - mean) ** 2) / (2 * s**2) - s.log() - LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, x.ndim)))


# -- the likelihood ---------------------------------------------------------------------------
class StepLikelihood:
    """Log-density of sampled transitions under a UNet with CFG, for SPO and D3PO.

    base: the `sd` or `sdxl` family's `DiffusionLikelihood`: its prompt encoder, VAE, null prompt
    and UNet call (`denoiser.kwargs`, SDXL's sampling time_ids) are reused.
    settings: the `spo` config section (`StepConfig`): sampler (ddim | ddpm), eta, guidance.
    """

    deterministic: bool = False  # the records change every round: a precomputed reference would be stale

    def __init__(self, base: Any, settings: Any) -> None:
        import diffusers

        self.base, self.settings = base, settings
        # every value the config holds, also those it took by default (`_use_default_values` would
        # make from_config drop them in favour of the other class's defaults)
        config = {k: v for k, v in base.scheduler.config.items() if not k.startswith("_")}
        cls = diffusers.DDIMScheduler if settings.sampler == "ddim" else diffusers.DDPMScheduler
        self.scheduler = cls.from_config(config, prediction_type=base.prediction_type)
        c = self.scheduler.config
        if c.thresholding:
            raise ValueError("the step likelihood does not support dynamic thresholding (scheduler thresholding)")
        self.clip_range = float(c.clip_sample_range) if c.clip_sample else None
        self.final_alpha = float(getattr(self.scheduler, "final_alpha_cumprod", 1.0))
        self.prediction_type = base.prediction_type
        self._null: dict[str, Tensor] | None = None

    # frozen parts: the sampler decodes with the VAE; validation uses the base's pipeline
    @property
    def vae(self) -> Any:
        return self.base.vae

    def to(self, device: torch.device | str) -> "StepLikelihood":
        self.base.to(device)
        self._null = None
        return self

    def validate(self, model: torch.nn.Module, step: int, folder: str | Path) -> dict[str, float]:
        return self.base.validate(model, step, folder)

    # -- schedule ---------------------------------------------------------------------------
    def timesteps(self) -> tuple[Tensor, Tensor]:
        """The sampler's timesteps (S,) and the previous timestep of each (S,), -1 past the end:
        DDIM's t - T/S (its `step()`), DDPM's next timestep (its `previous_timestep`)."""
        s = self.scheduler
        s.set_timesteps(self.settings.num_steps)
        ts = s.timesteps.long().cpu()
        if self.settings.sampler == "ddim":
            prev = ts - s.config.num_train_timesteps // s.num_inference_steps
        else:
            prev = torch.cat([ts[1:], torch.tensor([-1])])
        return ts, prev

    def transition(self, output: Tensor, x_t: Tensor, timesteps: Tensor,
                   prev_timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean (N, ...), std (N,), x̂0 (N, ...)) float32 of x_{t-1} from the (guided) model output."""
        ac = self.scheduler.alphas_cumprod
        alpha_t = alphas_at(ac, timesteps.to(x_t.device), self.final_alpha)
        alpha_prev = alphas_at(ac, prev_timesteps.to(x_t.device), self.final_alpha)
        x0, eps = predict_x0_eps(output, x_t, alpha_t, self.prediction_type, self.clip_range)
        if self.settings.sampler == "ddim":
            mean, std = ddim_transition(x0, eps, alpha_t, alpha_prev, self.settings.eta)
        else:
            mean, std = ddpm_transition(x0, x_t, alpha_t, alpha_prev, timesteps, self.scheduler.config.variance_type)
        return mean, std, x0

    def predict_x0(self, output: Tensor, x: Tensor, timesteps: Tensor) -> Tensor:
        """x̂0 (N, ...) of samples x at `timesteps` (N,) from the (guided) model output there."""
        alpha = alphas_at(self.scheduler.alphas_cumprod, timesteps.to(x.device), self.final_alpha)
        return predict_x0_eps(output, x, alpha, self.prediction_type, self.clip_range)[0]

    # -- conditioning and the guided model output ----------------------------------------------
    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """Token ids of the base family's text encoders (`PromptEncoder.tokenize`)."""
        return self.base.conditioning.encoder.tokenize(prompts)

    def latent_shape(self) -> tuple[int, ...]:
        return self.base.latents.latent_shape()

    def encode(self, input_ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """Prompt conditioning (n, ...) from token ids, plus SDXL's time_ids [res, res, 0, 0, res, res]
        (generated images: original = target size, no crop), as the SDXL pipeline samples."""
        cond = self.base.conditioning.encoder.encode(input_ids)
        first = next(iter(cond.values()))
        cond.update(self.base.denoiser.sampling_conditioning(first.shape[0], self.base.settings.resolution,
                                                             first.device))
        return cond

    def null_conditioning(self) -> dict[str, Tensor]:
        """(1, ...) negative conditioning: encode("") or zeros (`diffusion.null_prompt`), cached."""
        if self._null is None:
            cond = self.encode(self.tokenize([""]))
            if self.base.settings.null_prompt == "zeros":
                cond = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.items()}
            self._null = cond
        return self._null

    def guided_output(self, model: torch.nn.Module, x: Tensor, timesteps: Tensor,
                      cond: dict[str, Tensor]) -> Tensor:
        """u + w (c - u) of the model output (ε, v or x0) at x (N, ...), timesteps (N,); cond holds
        per-item (N, ...) prompt conditioning. One UNet call on [null; prompt] (2N), as the pipelines."""
        w, n = self.settings.guidance, x.shape[0]
        dtype = next(model.parameters()).dtype
        if w == 1.0:
            values, xs, ts = cond, x, timesteps
        else:
            null = {k: v.to(cond[k].device).expand(n, *v.shape[1:]) for k, v in self.null_conditioning().items()}
            values = {k: torch.cat([null[k], cond[k]]) for k in cond}
            xs, ts = torch.cat([x, x]), torch.cat([timesteps, timesteps])
        out = model(xs.to(dtype), ts.to(x.device), **self.base.denoiser.kwargs(values, dtype), return_dict=False)[0]
        out = out.float()
        if w == 1.0:
            return out
        uncond, text = out.chunk(2)
        return uncond + w * (text - uncond)

    # -- the Likelihood contract (mmalign.types.Likelihood; `to` and `validate` above) --------------
    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        """Transition pair records -> a "pair" batch of 2B items (chosen rows first).

        inputs: x_t, x_prev (2B, C, h, w) float32; timesteps, prev_timesteps (2B,) long;
        input_ids (2B, L) [input_ids_2] of the prompts."""
        if kind != "pair":
            raise ValueError(f"step-aware data is paired transitions; got a '{kind}' batch")
        items = flatten(records, kind)
        slots = batch_slots(records, kind)

        def start(item: dict[str, Any], row: int) -> Tensor:
            if "x_t" in item:
                return item["x_t"]
            return item["chosen_x_t" if slots[row][1] == 0 else "rejected_x_t"]

        inputs: dict[str, Any] = {
            "x_t": torch.stack([start(item, row) for row, item in enumerate(items)]).float(),
            "x_prev": torch.stack([item["response"] for item in items]).float(),
            "timesteps": torch.tensor([int(item["timestep"]) for item in items]),
            "prev_timesteps": torch.tensor([int(item["prev_timestep"]) for item in items]),
        }
        inputs.update(self.tokenize([str(item["prompt"]) for item in items]))
        return batch_fields(records, kind, inputs)

    def draw(self, batch: PreferenceBatch, generator: torch.Generator | None = None) -> Draw:
        """Nothing to draw: the transitions carry their randomness."""
        return Draw()

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw | None = None) -> LogpOutput:
        """logps (N,): mean-over-dims log N(x_{t-1}; μ_θ(x_t, t), σ_t²) with the guided output;
        diagnostics {"step_std": σ_t (N,)}."""
        x = batch.inputs
        ids = {k: v for k, v in x.items() if k.startswith("input_ids")}
        cond = self.encode(ids)
        output = self.guided_output(model, x["x_t"], x["timesteps"], cond)
        mean, std, _ = self.transition(output, x["x_t"], x["timesteps"], x["prev_timesteps"])
        if bool((std <= 0).any()):
            raise ValueError("a transition with zero variance (the deterministic last step) has no density; "
                             "the sampler must not turn such steps into pairs")
        return LogpOutput(logps=gaussian_logp(x["x_prev"], mean, std), diagnostics={"step_std": std.detach()})
