"""Diffusion-DPO: mmalign vs the reference recipe's way, on a small SDXL-shaped model.

Both sides do the same math on the same pairs in the same order, with the same random draws
(t, ε, flips, crops, dropped captions, VAE posterior samples: mmalign's `draw` for the step's
seed), the same frozen reference copy (full fine-tuning), Adafactor with the official settings,
fp32. What differs is how the work is done:

- reference: the loop of the official `train_diffusion_dpo_sdxl.py`, written out here: every
  step decodes the PNGs and runs the VAE encoder and both text encoders, gradient checkpointing
  on (the official script forces it), policy forward then `torch.no_grad()` reference forward,
  `inside = -0.5·β·[(mse_θ(w) - mse_θ(l)) - (mse_ref(w) - mse_ref(l))]`, loss `-log σ(inside)`.
- mmalign: `PreferenceTrainer.train_step()` reading latent distributions and text embeddings
  from the `mmalign cache` (float32 storage, so the draws are bit-equal), reference forward in
  `inference_mode`, no gradient checkpointing (it fits).

Each side runs in a fresh interpreter (peak RSS growth measured there), alternating order,
`--repeats` times; the table gives medians and a breakdown of a step's time (collate, VAE, text
encoders, other draw work, reference forward, policy forward, backward, optimizer). The
first losses must agree within `--loss-tol`, else the timings compare different math (exit 1).
The one-off `mmalign cache` time is reported beside the rate.

    python -m benchmarks.diffusion_dpo                 # ~3 minutes on 2 CPU cores
    python -m benchmarks.diffusion_dpo --steps 20 --repeats 3 --out /tmp/diffusion_dpo.json
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import diffusion_cache, measure

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("reference", "mmalign")
PHASES = ("collate", "vae", "text_encoders", "draw_other", "reference_forward", "policy_forward", "backward",
          "optimizer")


@dataclasses.dataclass
class Settings(diffusion_cache.Settings):
    steps: int = 12
    warmup: int = 2
    repeats: int = 2
    cache_dtype: str = "float32"  # exact draws: the two sides' losses can be compared tightly
    beta: float = 5000.0
    lr: float = 1e-5
    # The VAE runs on other batch compositions in `mmalign cache` than in the per-step loop: latents
    # differ by float rounding (~1e-7), which β = 5000 amplifies to ~1e-4 in the loss.
    loss_tol: float = 1e-3


def config(work: Path, s: Settings, side: str) -> Any:
    cfg = diffusion_cache.make_config(work, s, cached=side == "mmalign", run=f"run_{side}")
    cfg.loss.beta, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay = s.beta, "adafactor", s.lr, 1e-2
    cfg.reference.strategy = "frozen"
    return cfg


class Clock:
    """Adds wall time per phase; `wrap(obj, name, phase)` times a method, `phase_of` may pick the
    phase per call (the policy and the reference share `logps`)."""

    def __init__(self) -> None:
        self.spent = dict.fromkeys(PHASES, 0.0)

    def wrap(self, obj: Any, name: str, phase: str | Callable[[], str]) -> None:
        method = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            tic = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.spent[phase() if callable(phase) else phase] += time.perf_counter() - tic

        setattr(obj, name, timed)

    def time(self, phase: str, fn: Callable[[], Any]) -> Any:
        tic = time.perf_counter()
        out = fn()
        self.spent[phase] += time.perf_counter() - tic
        return out


def time_draw(clock: Clock, likelihood: Any) -> None:
    """draw = collate-free augmentation + VAE + text encoders: time the encoders apart."""
    from mmalign.modalities.diffusion import ImageLatents
    from mmalign.modalities.text import TextConditioning

    clock.wrap(likelihood, "collate", "collate")
    if isinstance(likelihood.latents, ImageLatents):  # a cached likelihood has neither
        clock.wrap(likelihood.latents, "latent_dist", "vae")
    if isinstance(likelihood.conditioning, TextConditioning):
        clock.wrap(likelihood.conditioning.encoder, "encode", "text_encoders")
    draw = likelihood.draw

    def timed_draw(*args: Any, **kwargs: Any) -> Any:
        before = clock.spent["vae"] + clock.spent["text_encoders"]
        tic = time.perf_counter()
        out = draw(*args, **kwargs)
        clock.spent["draw_other"] += time.perf_counter() - tic - (clock.spent["vae"] + clock.spent["text_encoders"] - before)
        return out

    likelihood.draw = timed_draw


def recipe_step(likelihood: Any, model: Any, ref: Any, values: dict[str, Any], clock: Any, *, beta: float,
                optimizer: Any, max_grad_norm: float, autocast: Callable[[], Any] = contextlib.nullcontext,
                ref_dtype: Any = None, policy_dtype: Any = None) -> Any:
    """One step of the official Diffusion-DPO script on one draw's `values` (latents, noise,
    timesteps, conditioning): ε-mse of the policy and of the frozen copy, loss
    −log σ(−β/2 ((mse_w − mse_l)_θ − (mse_w − mse_l)_ref)), backward, gradient clipping and the
    optimizer step, each phase timed by `clock.time`. Returns the loss (scalar tensor).
    `autocast` / `ref_dtype`: the GPU row's bf16 autocast and the reference copy's dtype;
    `policy_dtype`: the dtype the policy's inputs are cast to (float32; bf16 base weights: bf16, as
    the official SDXL script casts the latents and conditioning to weight_dtype)."""
    import torch
    import torch.nn.functional as F

    ref_dtype, policy_dtype = ref_dtype or torch.float32, policy_dtype or torch.float32
    v = values
    # contiguous: the CPU VAE returns channels-last latents, and diffusers' ResnetBlock2D makes the
    # shortcut input contiguous only in train mode, so the train-mode policy and the eval-mode copy
    # would take different conv kernels (bf16 outputs apart by 1.6e-2, first loss 1.12 instead of
    # log 2 at beta 5000: measured on CPU with gpu --tiny; not checked on CUDA).
    noisy = likelihood.scheduler.add_noise(v["latents"], v["noise"], v["timesteps"]).contiguous()

    def mse(net: Any, dtype: Any) -> Any:
        with autocast():
            pred = net(noisy.to(dtype), v["timesteps"], **likelihood.denoiser.kwargs(v, dtype)).sample
        return F.mse_loss(pred.float(), v["noise"].float(), reduction="none").mean(dim=(1, 2, 3))

    model_w, model_l = clock.time("policy_forward", lambda: mse(model, policy_dtype)).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = clock.time("reference_forward", lambda: mse(ref, ref_dtype)).chunk(2)
    loss = -F.logsigmoid(-0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))).mean()
    clock.time("backward", loss.backward)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock.time("optimizer", update)
    return loss.detach()


def reference_side(work: Path, s: Settings) -> dict[str, Any]:
    """The official script's loop (see the module docstring), on mmalign's uncached draws."""
    import torch

    from mmalign.data.preference import StreamSampler, load_preference_data
    from mmalign.modalities import build_modality
    from mmalign.train.optim import build_optimizer
    from mmalign.train.trainer import step_seed

    tic = time.perf_counter()
    cfg = config(work, s, "reference")
    unet, likelihood, _ = build_modality(cfg)
    ref_unet = copy.deepcopy(unet).requires_grad_(False)
    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = build_optimizer(unet.parameters(), cfg.optim)
    records, _ = load_preference_data(cfg.data.train)
    sampler = StreamSampler(len(records), s.seed)
    setup = time.perf_counter() - tic
    clock = Clock()
    time_draw(clock, likelihood)
    start, ends, losses = time.perf_counter(), [], []
    for step in range(s.steps):
        seed = step_seed(s.seed, step, 0, 0)
        torch.manual_seed(seed)
        idx = sampler.micro_batch(step, s.batch_size, 0, 1)
        batch = likelihood.collate([dict(records[i], _index=i) for i in idx], "pair")
        values = likelihood.draw(batch, torch.Generator().manual_seed(seed)).values
        loss = recipe_step(likelihood, unet, ref_unet, values, clock, beta=s.beta, optimizer=optimizer,
                           max_grad_norm=cfg.optim.max_grad_norm)
        losses.append(float(loss))
        ends.append(time.perf_counter())
    return {"step_ends": ends, "start": start, "losses": losses, "setup_s": setup,
            "extra": {"seconds_in": clock.spent, "total_s": ends[-1] - start}}


def mmalign_side(work: Path, s: Settings) -> dict[str, Any]:
    """`PreferenceTrainer.train_step()` on the cache (written by the parent process)."""
    import torch

    from mmalign.modalities import build_modality
    from mmalign.train.trainer import PreferenceTrainer

    tic = time.perf_counter()
    cfg = config(work, s, "mmalign")
    unet, likelihood, _ = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, unet, likelihood)
    setup = time.perf_counter() - tic
    clock = Clock()
    time_draw(clock, likelihood)
    phase = lambda: "reference_forward" if torch.is_inference_mode_enabled() else "policy_forward"  # noqa: E731
    clock.wrap(likelihood, "logps", phase)
    clock.wrap(trainer.accelerator, "backward", "backward")
    clock.wrap(trainer.optimizer, "step", "optimizer")
    clock.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")  # as the reference side's update()
    start, ends, losses = time.perf_counter(), [], []
    for _ in range(s.steps):
        losses.append(float(trainer.train_step()["loss"]))
        ends.append(time.perf_counter())
    return {"step_ends": ends, "start": start, "losses": losses, "setup_s": setup,
            "extra": {"seconds_in": clock.spent, "total_s": ends[-1] - start,
                      "loaded_vae": likelihood.vae is not None}}


def load_settings(workdir: Path) -> Settings:
    data = json.loads((workdir / "settings.json").read_text())
    data["image_size"] = tuple(data["image_size"])
    return Settings(**data)


def _warm_imports() -> None:
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    import mmalign.train.trainer  # noqa: F401


def summarise(runs: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    by = {side: [r for r in runs if r["side"] == side] for side in SIDES}
    med = {side: {"pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
                  "rss_growth_mib": statistics.median(r["rss_growth_mib"] for r in rs),
                  "setup_s": statistics.median(r["setup_s"] for r in rs),
                  "ms_per_step": {p: 1000 * statistics.median(r["seconds_in"][p] for r in rs) / s.steps
                                  for p in PHASES}}
           for side, rs in by.items()}
    for side in SIDES:  # what no wrapper saw: the loss arithmetic, metrics, Python overhead
        total = 1000 * statistics.median(r["total_s"] for r in by[side]) / s.steps
        med[side]["ms_per_step"]["other"] = total - sum(med[side]["ms_per_step"][p] for p in PHASES)
        med[side]["ms_per_step"]["total"] = total
    diff = max(abs(a - b) for r in by["reference"] for m in by["mmalign"] for a, b in zip(r["losses"], m["losses"]))
    return {"median": med, "spread": {side: measure.spread([r["pairs_per_s"] for r in rs]) for side, rs in by.items()},
            "speedup": med["mmalign"]["pairs_per_s"] / med["reference"]["pairs_per_s"],
            "memory_ratio": med["mmalign"]["rss_growth_mib"] / med["reference"]["rss_growth_mib"],
            "max_loss_diff": diff, "losses_agree": diff <= s.loss_tol}


def table(summary: dict[str, Any], s: Settings, cache: dict[str, Any]) -> str:
    m, sp = summary["median"], summary["spread"]
    rows = [f"Diffusion-DPO on a small SDXL-shaped model ({s.resolution}px crops, batch {s.batch_size} pairs, "
            f"{s.steps} steps ({s.warmup} warm-up), frozen reference, Adafactor, fp32, {s.threads} thread(s)); "
            f"median of {s.repeats} runs per side",
            f"{'':34}{'reference recipe':>18}{'mmalign':>12}{'ratio':>8}"]

    def row(label: str, a: float, b: float, fmt: str = ".3g", note: tuple[str, str] = ("", "")) -> None:
        rows.append(f"{label:34}{format(a, fmt) + note[0]:>18}{format(b, fmt) + note[1]:>12}{b / a if a else 0:>8.2f}")

    r, mm = m["reference"], m["mmalign"]
    row("pairs/s (after warm-up)", r["pairs_per_s"], mm["pairs_per_s"],
        note=(f" (±{50 * sp['reference']:.0f}%)", f" (±{50 * sp['mmalign']:.0f}%)"))
    row("peak RSS growth, MiB", r["rss_growth_mib"], mm["rss_growth_mib"], ".0f")
    rows.append("time per step, ms:")
    for p in (*PHASES, "other", "total"):
        row(f"  {p}", r["ms_per_step"][p], mm["ms_per_step"][p], ".1f")
    rows.append(f"{'one-off mmalign cache, s / MiB':34}{'':>18}{cache['seconds']:>7.1f} / {cache['mib']:.1f}")
    agree = "agree" if summary["losses_agree"] else "DISAGREE"
    rows.append(f"{'losses, max |reference - mmalign|':34}{summary['max_loss_diff']:>18.1e}  {agree} (tol {s.loss_tol})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_side

    s, out = diffusion_cache.parse_settings(Settings, argv, __doc__, "diffusion_dpo.json")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "settings.json").write_text(json.dumps(dataclasses.asdict(s)))
        diffusion_cache.build_pipeline(work / "pipeline", s.seed)
        diffusion_cache.write_pairs(work, s)
        cache = diffusion_cache.build_cache(work, s)
        order = [list(SIDES), list(reversed(SIDES))]
        runs = [run_side(side, work, s.threads, f"{side}{r}", module="benchmarks.diffusion_dpo")
                for r in range(s.repeats) for side in order[r % 2]]
    summary = summarise(runs, s)
    print(table(summary, s, cache))
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    out.write_text(json.dumps({"settings": dataclasses.asdict(s), "versions": versions, "summary": summary,
                               "cache": cache, "runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0 if summary["losses_agree"] else 1


if __name__ == "__main__":
    import sys

    if "--side" in sys.argv:
        measure.run_side(__doc__, {"reference": reference_side, "mmalign": mmalign_side}, load_settings,
                         _warm_imports, sys.argv[1:])
    else:
        raise SystemExit(main())
