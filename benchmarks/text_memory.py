"""Where mmalign's peak memory goes on the realistic text row (`benchmarks.text_real`), by phase.

One mmalign run (the text_real model and pairs) with its phases wrapped; for each phase of a
step, the process's resident set before the phase, its high-water mark during the phase (the
kernel's VmHWM, reset at the phase's start: `measure.reset_peak`) and after it:

    static       = weights (policy + frozen reference) + gradients + AdamW moments (bytes counted)
    reference    = the frozen reference's forward (`inference_mode`, chunked head without grad)
    policy       = the policy's forward (hidden states kept for the backward)
    backward     = the backward (the chunked head recomputes each chunk's logits)
    optimizer    = AdamW's step

The chunk transient is ~4 × chunk × V × 4 bytes (logits, their exp, the gather's and the
log-sum-exp's gradients), so `model.lm_head_chunk` sets most of the peak above the static part.

    python -m benchmarks.text_memory --steps 3 --chunks 1024 512 256     # ~1 minute per chunk size
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import measure, text_real

PHASES = ("reference", "policy", "backward", "optimizer")


def _wrap(obj: Any, name: str, phase: str | Callable[[], str], log: dict[str, list[dict[str, float]]]) -> None:
    method = getattr(obj, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        key = phase() if callable(phase) else phase
        before = measure.current_mib()
        measure.reset_peak()
        try:
            return method(*args, **kwargs)
        finally:
            log[key].append({"before": before, "peak": measure.peak_mib(), "after": measure.current_mib()})

    setattr(obj, name, wrapped)


def static_mib(trainer: Any) -> dict[str, float]:
    """Bytes of the policy's and reference's weights, the gradients and the optimizer state, MiB."""
    import torch

    def size(tensors: Any) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    policy = list(trainer.unwrapped.parameters())
    ref = getattr(trainer.reference, "model", None)
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"policy_weights": size(policy), "reference_weights": size(ref.parameters()) if ref is not None else 0.0,
            "gradients": size(p for p in policy if p.requires_grad), "optimizer_state": size(state)}


def profile_side(workdir: Path, s: text_real.Settings, chunk: int) -> dict[str, Any]:
    """`s.steps` mmalign steps on the text_real inputs with `model.lm_head_chunk = chunk`, phases wrapped."""
    import torch

    from mmalign.config import Config, from_dict, validate
    from mmalign.modalities import build_modality
    from mmalign.train.trainer import PreferenceTrainer

    tic = time.perf_counter()
    base = measure.current_mib()
    cfg = from_dict(Config, {
        "model": {"path": str(workdir / "model"), "dtype": "float32", "lm_head_chunk": chunk},
        "data": {"train": str(workdir / "pairs.jsonl"), "max_length": s.max_length},
        "loss": {"name": "dpo", "beta": s.beta}, "reference": {"strategy": "frozen"},
        "optim": {"name": "adamw", "lr": s.lr, "weight_decay": 0.0, "scheduler": "constant",
                  "max_grad_norm": s.max_grad_norm},
        "train": {"output_dir": str(workdir / f"profile_{chunk}"), "max_steps": s.steps, "batch_size": s.batch_size,
                  "mixed_precision": "no", "seed": s.seed, "cpu": True, "progress": False, "tensorboard": False}})
    validate(cfg)
    model, likelihood, processor = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, model, likelihood, processor)
    built = measure.current_mib()
    log: dict[str, list[dict[str, float]]] = {p: [] for p in PHASES}
    _wrap(likelihood, "logps", lambda: "reference" if torch.is_inference_mode_enabled() else "policy", log)
    _wrap(trainer.accelerator, "backward", "backward", log)
    _wrap(trainer.optimizer, "step", "optimizer", log)
    start, ends, losses = time.perf_counter(), [], []
    for _ in range(s.steps):
        losses.append(trainer.train_step()["loss"])
        ends.append(time.perf_counter())
    phases = {p: {"peak_over_base_mib": max(r["peak"] for r in rs) - base,
                  "transient_mib": max(r["peak"] - r["before"] for r in rs)} for p, rs in log.items() if rs}
    return {"setup_s": start - tic, "start": start, "step_ends": ends, "losses": losses,
            "extra": {"chunk": chunk, "after_build_mib": built - base, "static_mib": static_mib(trainer),
                      "phases": phases, "phase_log": log}}


SIDES = {f"chunk{c}": (lambda w, s, c=c: profile_side(w, s, c)) for c in (0, 128, 256, 512, 1024, 2048)}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_side

    p = argparse.ArgumentParser(prog="python -m benchmarks.text_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 256])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "text_memory.json")
    a = p.parse_args(argv)
    s = text_real.Settings(steps=a.steps, warmup=min(2, a.steps - 1))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="mmalign_bench_mem_") as tmp:
        text_real.prepare(Path(tmp), s)
        for c in a.chunks:
            runs[c] = run_side(f"chunk{c}", Path(tmp), s.threads, f"chunk{c}", "benchmarks.text_memory")
            r = runs[c]
            print(f"[memory] lm_head_chunk {c}: after build +{r['after_build_mib']:.0f} MiB, static "
                  + ", ".join(f"{k} {v:.0f}" for k, v in r["static_mib"].items()) + "; peak over base by phase: "
                  + ", ".join(f"{k} {v['peak_over_base_mib']:.0f} (transient {v['transient_mib']:.0f})"
                              for k, v in r["phases"].items()) + f"; losses {r['losses']}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"benchmark": "text_memory", "settings": vars(s) if hasattr(s, "__dict__") else {},
                                 "runs": {str(k): v for k, v in runs.items()}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    if "--side" in sys.argv:
        measure.run_side(__doc__, SIDES, text_real.load_settings, text_real._imports, sys.argv[1:])
    else:
        sys.exit(main())
