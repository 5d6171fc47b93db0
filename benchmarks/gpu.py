"""GPU section of the benchmarks: full-size architectures with random weights, on one CUDA device.

    python -m benchmarks.gpu                      # needs CUDA; otherwise prints one line and exits 0
    python -m benchmarks.gpu --rows sdxl_lora     # one row; --steps / --sdxl-batch / --llava-batch ...
    python -m benchmarks.gpu --tiny               # the same code with tiny shapes on CPU (what tests run)
    python -m benchmarks.gpu --quick              # issue 20's rows in one command: text_128k, sd15_lora,
                                                  # sdxl_lora, flux_cache, 5 steps per side (2 warm-up)
    python -m benchmarks.gpu --quick --tiny       # its CPU dry run (tests/test_bench_gpu.py)

The JSON report is rewritten (atomically) after every row, so a kill at a time limit keeps the
rows that finished (SIGTERM: "stopped_during" names the row it stopped). A row or side that
fails is recorded with its error and the next one still runs; the exit status is then 1.

Rows (each side: pairs/s after warm-up, peak memory, phase breakdown, FLOPs of one step):

- `sdxl_lora` / `sdxl_full`: Diffusion-DPO on the SDXL base UNet built from its config (2.6 B
  parameters, fp32 weights, bf16 autocast), 1024² images -> latents 4x128x128, β 5000. LoRA r 64
  on to_q/to_k/to_v/to_out.0 with AdamW, or full fine-tuning with Adafactor (official settings).
  * mmalign: `PreferenceTrainer.train_step()` on a real `mmalign cache` (float32) of the pairs,
    written once with the full-size SDXL VAE and the two text encoders (CLIP ViT-L and OpenCLIP
    bigG text configs, random weights), which are then freed; reference = LoRA adapters off
    (LoRA) or mmalign's frozen copy (full); no gradient checkpointing (`--checkpointing auto`:
    retried with it after an out-of-memory error, and the row says so).
  * recipe: the official Diffusion-DPO loop written out (as in `benchmarks/diffusion_dpo.py`):
    every step decodes the PNGs, runs the VAE (fp32) and both text encoders (bf16, the script's
    weight_dtype) on mmalign's uncached draw, gradient checkpointing on, a frozen reference copy
    cast to bf16 (LoRA: a copy of the base UNet), policy forward, `no_grad` reference forward,
    `-log σ(-0.5·β·[(mse_θ(w)-mse_θ(l)) - (mse_ref(w)-mse_ref(l))])`.
  Both sides get the same pairs, order, step seeds and draws (t, ε, flips, dropped captions).
- `llava`: LLaVA-1.5-7B from its config (CLIP ViT-L/14-336 tower, 2-layer MLP projector,
  Llama-2-7B, vocabulary 32064), random bf16 weights, LoRA r 64 on the language model's linear
  layers, reference = adapters off, bf16 autocast, 576 image tokens + ~100 prompt + ~100 answer
  tokens per sequence. mmalign's `llava` path end to end: `LlavaLikelihood` with a real
  `LlavaProcessor` (CLIP image processor at 336 px, LLaVA-1.5 chat template) over a word-level
  tokenizer (mmalign.toyvlm: a real 32k SentencePiece vocabulary cannot be built offline; the
  model's embedding still has 32064 rows, the ids used are a subset). mmalign side only:
  `benchmarks/gpu_llava.py`.
- `text_128k`: text DPO at vocabulary 128,256 (Llama-3.2-1B-shaped, untied head), mmalign's
  chunked LM head and `data.padding_free` vs TRL's DPOTrainer (+ its gradient checkpointing):
  `benchmarks/gpu_text.py`.
- `sd15_lora`: Diffusion-DPO on SD1.5 at real architecture, mmalign (cache) vs the recipe's loop;
  `flux_cache`: Flow-DPO on a FLUX-shaped transformer with a T5-XXL-width encoder, cached vs
  uncached: `benchmarks/gpu_pipelines.py`.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one whole train step as executed (policy
forward + backward + reference forward, and for the recipe also the VAE, the text encoders and
the checkpointing recompute); TFLOP/s = those FLOPs / mean step time; "% peak" divides by the
device's dense bf16 peak (PEAK_BF16_TFLOPS; unknown devices: absolute only). The SDXL rows also
give "model TFLOP/s" = the UNet work alone (mmalign's cached step without checkpointing counts
exactly that) / each side's step time, so the two sides' numbers compare like for like.
Phase times synchronise the device at every phase boundary.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import gpu_text, measure

ROOT = Path(__file__).resolve().parent.parent
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers UNet2DConditionModel).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
# vae/config.json (AutoencoderKL, factor 8, scaling 0.13025).
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,  # text_encoder
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,  # text_encoder_2
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
# llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 tower, Llama-2-7B (Vicuna-7B v1.5) with 32064 rows.
CLIP_L336_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA2_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 hidden_act="silu", tie_word_embeddings=False)
TINY = {  # --tiny: the same architectures, shrunk (SDXL's 3 levels and text_time conditioning kept)
    "unet": dict(sample_size=8, block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 4, 8), cross_attention_dim=64 + 128, addition_time_embed_dim=16,
                 projection_class_embeddings_input_dim=6 * 16 + 64, norm_num_groups=16),
    "vae": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=64),
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64),
    "text_2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, projection_dim=64),
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, projection_dim=32),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256),
}
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s: (substrings of torch.cuda.get_device_name, peak).
PEAK_BF16_TFLOPS = ((("H100", "PCIe"), 756.0), (("H100", "HBM3"), 989.0), (("H100", "SXM"), 989.0),
                    (("H200",), 989.0), (("A100",), 312.0))
PHASES = ("collate", "draw", "vae", "text_encoders", "policy_forward", "reference_forward", "backward", "optimizer")
LORA_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = ("sdxl_lora", "sdxl_full", "llava", "text_128k", "sd15_lora", "flux_cache")
# --quick: issue 20's full-size rows in one command (planned to fit 10 minutes on one H100; not yet run on one)
QUICK_ROWS = "text_128k,sd15_lora,sdxl_lora,flux_cache"
QUICK_STEPS, QUICK_WARMUP = 5, 2


@dataclasses.dataclass
class Settings:
    tiny: bool = False
    rows: str = ",".join(ROWS)
    steps: int = 8  # per side, warm-up included
    warmup: int = 2
    sdxl_batch: int = 1  # pairs per step (the official SDXL recipe: 1 per GPU, gradient accumulation)
    llava_batch: int = 2
    resolution: int = 1024
    lora_rank: int = 64
    beta: float = 5000.0
    prompt_words: int = 100
    answer_words: int = 100
    checkpointing: str = "auto"  # mmalign sides: off, on, auto (off; on after an out-of-memory error)
    # The recipe's frozen reference copy: float32 (default) = mmalign's precision, so the two sides do
    # the same math; bfloat16 = the official script's cast to weight_dtype (less memory, other numbers).
    recipe_ref_dtype: str = "float32"
    seed: int = 0
    flux_blocks: int = 2  # flux_cache: double blocks (single: twice that) of FLUX.1's 19 + 38
    t5_layers: int = 24  # flux_cache: T5-XXL's 24 layers at its width
    flow_beta: float = 2000.0  # flux_cache: configs/flux/flow_dpo_lora.yaml's β
    text_sides: str = "mmalign,mmalign_packed,trl,trl_gc"  # text_128k

    def shrink(self) -> "Settings":
        return dataclasses.replace(self, steps=3, warmup=1, resolution=64, lora_rank=4, prompt_words=8,
                                   answer_words=6)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by its name; None when not in the table (H100 NVL, others)."""
    for parts, peak in PEAK_BF16_TFLOPS:
        if all(p in device_name for p in parts):
            return peak
    return None


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), FLOPs torch's FlopCounterMode sees while it runs: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


class Device:
    """Where a side runs, its clock (synchronised on CUDA) and its peak-memory reading."""

    def __init__(self, tiny: bool) -> None:
        import torch

        self.torch, self.cuda = torch, not tiny
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.name = torch.cuda.get_device_name() if self.cuda else f"cpu ({platform.processor() or 'unknown'}), tiny shapes"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        if self.cuda:  # drop the previous side's tensors before the next one is measured
            gc.collect()
            self.torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.free()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            self.base, self.method = self.torch.cuda.memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
        else:
            self.method, self.base = "CPU RSS growth: " + measure.reset_peak(), measure.current_mib()

    def peak(self) -> dict[str, Any]:
        """peak_mib: max_memory_allocated (CUDA; baseline_mib was allocated before) or RSS growth (CPU)."""
        if self.cuda:
            return {"peak_mib": self.torch.cuda.max_memory_allocated() / 2**20, "baseline_mib": self.base,
                    "peak_reserved_mib": self.torch.cuda.max_memory_reserved() / 2**20, "memory_method": self.method}
        return {"peak_mib": measure.peak_mib() - self.base, "baseline_mib": 0.0, "memory_method": self.method}


class PhaseClock:
    """Wall time per phase; the device is synchronised before and after each timed call."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.active = sync, True
        self.spent = dict.fromkeys(PHASES, 0.0)

    def time(self, phase: str | Callable[[], str], fn: Callable[[], Any]) -> Any:
        if not self.active:
            return fn()
        self.sync()
        tic = time.perf_counter()
        try:
            return fn()
        finally:
            self.sync()
            self.spent[phase() if callable(phase) else phase] += time.perf_counter() - tic

    def wrap(self, obj: Any, name: str, phase: str | Callable[[], str]) -> None:
        method = getattr(obj, name)
        setattr(obj, name, lambda *a, **k: self.time(phase, lambda: method(*a, **k)))

    def wrap_likelihood(self, likelihood: Any) -> None:
        """collate, draw (VAE and text encoders inside it are timed apart), logps by reference/policy."""
        import torch

        from mmalign.modalities.diffusion import DiffusionLikelihood, ImageLatents
        from mmalign.modalities.text import TextConditioning

        for name, phase in [("collate", "collate"), ("draw", "draw")]:
            self.wrap(likelihood, name, phase)
        if isinstance(likelihood, DiffusionLikelihood):  # LLaVA's text encoding is part of its collate
            if isinstance(likelihood.latents, ImageLatents):
                self.wrap(likelihood.latents, "latent_dist", "vae")
            if isinstance(likelihood.conditioning, TextConditioning):
                self.wrap(likelihood.conditioning.encoder, "encode", "text_encoders")
        self.wrap(likelihood, "logps",
                  lambda: "reference_forward" if torch.is_inference_mode_enabled() else "policy_forward")


def run_steps(step: Callable[[], Any], clock: PhaseClock, dev: Device, s: Settings, pairs: int) -> dict[str, Any]:
    """`s.steps` steps (phases counted after the warm-up), then one more under FlopCounterMode."""
    losses, ends = [], []
    start = time.perf_counter()
    for i in range(s.steps):
        if i == s.warmup:
            clock.spent = dict.fromkeys(PHASES, 0.0)
        losses.append(float(step()))  # float() waits for the device
        dev.sync()
        ends.append(time.perf_counter())
    timed = s.steps - s.warmup
    mean_s = (ends[-1] - (ends[s.warmup - 1] if s.warmup else start)) / timed
    ms = {p: 1000 * v / timed for p, v in clock.spent.items()}
    ms["draw"] -= ms["vae"] + ms["text_encoders"]  # draw = its own work apart from the encoders
    ms["other"] = 1000 * mean_s - sum(ms.values())
    clock.active = False
    _, flops = count_flops(step)
    return {"pairs_per_s": measure.steady_rate(ends, start, s.warmup, pairs), "step_ms_mean": 1000 * mean_s,
            "step_ms_median": 1000 * statistics.median(measure.step_durations(ends, start)[s.warmup:]),
            "ms_per_step": ms, "losses": losses, "step_flops": flops, "tflops": flops / mean_s / 1e12, **dev.peak()}


# -- rows ------------------------------------------------------------------------------------
def attempt(run: Callable[[bool], dict[str, Any]], mode: str, dev: Device) -> dict[str, Any]:
    """Run a side with checkpointing off/on; auto: off, then on after an out-of-memory error. Any
    other error ends the side with {"error": ...}: the row's other sides still run.

    The memory is freed after the `except` block, not in it: there the exception's traceback
    still holds the failed side's frames (its model, optimizer and activations), so a retry
    would start with them allocated."""
    import torch

    tries = {"off": [False], "on": [True], "auto": [False, True]}[mode]
    error = "not run"
    for checkpointing in tries:
        try:
            return run(checkpointing)
        except torch.OutOfMemoryError as e:
            error, retry = f"out of memory: {(str(e).splitlines() or ['no message'])[0]}", True
        except Exception as e:  # noqa: BLE001 - one side's failure is that side's result
            error, retry = failure(e), False
        dev.free()  # the exception and its frames are gone now: their tensors can be freed
        if not retry:
            return {"error": error, "gradient_checkpointing": checkpointing}
    return {"error": error, "gradient_checkpointing": tries[-1]}


def failure(e: BaseException) -> str:
    """One side's or row's error for the report: type, message and where it was raised."""
    import traceback

    where = traceback.extract_tb(e.__traceback__)[-3:]
    return f"{type(e).__name__}: {str(e)[:500]} (at " + " <- ".join(
        f"{Path(f.filename).name}:{f.lineno}" for f in reversed(where)) + ")"


def table(report: dict[str, Any]) -> str:
    peak = report["peak_bf16_tflops"]
    lines = [f"GPU section on {report['device']} (dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'unknown'}), "
             f"torch {report['versions']['torch']}, {report['settings']['steps']} steps per side "
             f"({report['settings']['warmup']} warm-up)",
             f"{'row / side':28}{'ckpt':>5}{'pairs/s':>9}{'step ms':>9}{'peak MiB':>10}{'TFLOP/s':>9}"
             f"{'% peak':>8}{'model TFLOP/s':>15}"]
    if report.get("stopped_during"):
        lines.append(f"STOPPED (killed or interrupted) during row {report['stopped_during']}: the rows above finished")
    for row in report["rows"]:
        if "error" in row:  # the row stopped before it had sides to show
            lines.append(f"{row['name']}: FAILED after {row.get('seconds', 0):.0f} s: {row['error'][:300]}")
            continue
        lines.append(f"{row['name']}: {row['what']} ({row.get('seconds', 0):.0f} s)")
        if row["name"] == "text_128k":
            lines += gpu_text.table_lines(row)
            continue
        for name, r in row["sides"].items():
            if "error" in r:
                lines.append(f"  {name:26}{'on' if r['gradient_checkpointing'] else 'off':>5}  {r['error'][:70]}")
                continue
            frac = f"{100 * r['tflops'] / peak:.1f}" if peak else "-"
            model = f"{r['model_tflops']:.3g}" if r.get("model_tflops") else "-"
            lines.append(f"  {name:26}{'on' if r['gradient_checkpointing'] else 'off':>5}{r['pairs_per_s']:>9.3g}"
                         f"{r['step_ms_mean']:>9.1f}{r['peak_mib']:>10.0f}{r['tflops']:>9.3g}{frac:>8}{model:>15}")
            lines.append("    ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in r["ms_per_step"].items() if abs(v) >= 0.05))
        if "speedup" in row and not report["tiny"]:
            ratio = "cached/uncached" if row["name"] == "flux_cache" else "mmalign/recipe"
            lines.append(f"  {ratio}: pairs/s x{row['speedup']:.2f}, peak memory x{row['memory_ratio']:.2f}; "
                         f"first 3 losses differ by <= {row['max_loss_diff_first3']:.1e}")
            lines.append(f"  differs: {row['differs']}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> tuple[Settings, Path | None]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (the code path tests run)")
    p.add_argument("--quick", action="store_true",
                   help=f"rows {QUICK_ROWS}, {QUICK_STEPS} steps per side ({QUICK_WARMUP} warm-up): one command")
    for f in dataclasses.fields(Settings):
        if f.name != "tiny":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default benchmarks/results/gpu.json; --tiny: benchmarks/results/gpu_tiny.json)")
    a = p.parse_args(argv)
    s = Settings(tiny=a.tiny)
    s = dataclasses.replace(s, rows=QUICK_ROWS, steps=QUICK_STEPS, warmup=QUICK_WARMUP) if a.quick else s
    s = s.shrink() if a.tiny else s
    s = dataclasses.replace(s, **{f.name: getattr(a, f.name) for f in dataclasses.fields(Settings)
                                  if f.name != "tiny" and getattr(a, f.name) is not None})
    unknown = set(s.rows.split(",")) - set(ROWS) | set(s.text_sides.split(",")) - set(gpu_text.SIDES_ORDER)
    if (unknown or s.checkpointing not in ("off", "on", "auto") or s.recipe_ref_dtype not in ("float32", "bfloat16")
            or not 1 <= s.warmup < s.steps):
        p.error(f"--rows from {ROWS}, --text-sides from {gpu_text.SIDES_ORDER} (got {sorted(unknown)}), "
                "--checkpointing off|on|auto, "
                "--recipe-ref-dtype float32|bfloat16, 1 <= --warmup < --steps")
    return s, a.out


ROW_FOLDERS = {"text_128k": "text", "sd15_lora": "sd15", "flux_cache": "flux"}  # removed after their row


def run_row(name: str, work: Path, s: Settings, dev: Device) -> dict[str, Any]:
    from benchmarks import gpu_llava, gpu_pipelines, gpu_sdxl

    if name == "llava":
        return gpu_llava.llava_row(work, s, dev)
    if name == "text_128k":
        return gpu_text.text_row(work, s.tiny, s.steps, tuple(s.text_sides.split(",")))
    if name == "sd15_lora":
        return gpu_pipelines.sd15_row(work, s, dev)
    if name == "flux_cache":
        return gpu_pipelines.flux_row(work, s, dev)
    if not (work / "sdxl_pairs.jsonl").is_file():  # shared by both SDXL rows, as their cache
        gpu_sdxl.write_sdxl_pairs(work, s)
    return gpu_sdxl.sdxl_row(work, s, dev, name == "sdxl_lora")


def guarded_row(name: str, work: Path, s: Settings, dev: Device) -> dict[str, Any]:
    """`run_row`, its wall time in "seconds"; an error becomes the row {"name", "error"} so the
    rows after it still run. The failed row's memory is freed after the `except` block (its
    traceback holds the row's frames) and its folder (saved pipelines: GBs at full size) removed."""
    import shutil

    tic = time.perf_counter()
    try:
        row = run_row(name, work, s, dev)
    except Exception as e:  # noqa: BLE001 - one row's failure is that row's result
        row = {"name": name, "error": failure(e), "sides": {}}
    dev.free()
    if name in ROW_FOLDERS:
        shutil.rmtree(work / ROW_FOLDERS[name], ignore_errors=True)
    return {**row, "seconds": time.perf_counter() - tic}


def write_report(out: Path, report: dict[str, Any]) -> None:
    """The report so far, with its table, written atomically: a kill (a time limit) leaves the
    last complete file, holding every row finished before it."""
    from mmalign.io import atomic_path

    report["table"] = table(report)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=1))


def new_report(s: Settings, dev: Device) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    return {"section": "gpu", "date": datetime.date.today().isoformat(), "device": dev.name, "tiny": s.tiny,
            "peak_bf16_tflops": None if s.tiny else peak_tflops(dev.name), "settings": dataclasses.asdict(s),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "diffusers": diffusers.__version__, "python": platform.python_version()},
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "finished": False, "rows": []}


def run_rows(s: Settings, dev: Device, out: Path, report: dict[str, Any], start: float) -> None:
    """Each row in a scratch folder, the report rewritten after each; a kill names its row."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmalign_gpu_") as tmp:
        for name in s.rows.split(","):
            print(f"[gpu] {name} ... ({time.perf_counter() - start:.0f} s in)", flush=True)
            try:
                report["rows"].append(guarded_row(name, Path(tmp), s, dev))
            except BaseException:  # killed or interrupted: the finished rows stay, this one is named
                report["stopped_during"] = name
                write_report(out, report)
                raise
            write_report(out, report)
            print(f"[gpu] {name}: {report['rows'][-1].get('error', 'done')} in {report['rows'][-1]['seconds']:.0f} s; "
                  f"wrote {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the rows in order, writing the report after each one; exit 1 when a row failed."""
    import warnings

    import torch

    s, out = parse(argv)
    if not s.tiny and not torch.cuda.is_available():
        print("GPU section skipped: no CUDA device (torch.cuda.is_available() is False); "
              "`python -m benchmarks.gpu --tiny` runs the same code with tiny shapes on CPU")
        return 0
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging

    logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")  # the clock's wrapper
    dev = Device(s.tiny)
    out = out or ROOT / "benchmarks" / "results" / ("gpu_tiny.json" if s.tiny else "gpu.json")
    report, start = new_report(s, dev), time.perf_counter()
    # `timeout` sends SIGTERM: stop as on Ctrl-C, so a text side's child process is killed with us
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run_rows(s, dev, out, report, start)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["finished"] = True
    write_report(out, report)
    print(report["table"])
    print(f"[gpu] wrote {out} ({time.perf_counter() - start:.0f} s)")
    return 1 if any("error" in row for row in report["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
