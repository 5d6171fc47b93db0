"""Text row of `python -m benchmarks.gpu --quick`: text DPO at vocabulary 128,256 on one GPU.

Model: Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192) with an
untied 128,256-row output head (Llama 3 8B's), random fp32 weights, bf16 autocast. Data: the
long-tailed length mix of `benchmarks.text_real` (prompts LogNormal(log 96, 0.8) in [8, 512],
answers LogNormal(log 128, 0.9), sequences up to 1,024 tokens), word-level tokenizer (token
counts = word counts), nothing truncated. Sides, each in a fresh interpreter:
- `mmalign`: the chunked LM head (`model.lm_head_chunk`, default 1024: no (B, T, V) logits);
- `mmalign_packed`: plus `data.padding_free` (the pairs packed into one row);
- `trl`: TRL's DPOTrainer with mmalign's settings (`benchmarks.text_dpo.train_trl`), bf16;
- `trl_gc`: the same with gradient checkpointing (TRL's memory option).
Peak memory: `torch.cuda.max_memory_allocated` over the side (CPU `--tiny`: RSS growth).
`--tiny`: the same code on CPU with a 2-layer, width-64 model (the vocabulary stays 128,256).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from benchmarks import measure, text_real

FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SIDES_ORDER = ("mmalign", "mmalign_packed", "trl", "trl_gc")


@dataclass
class TextSettings(text_real.Settings):
    tiny: bool = False
    lm_head_chunk: int = 1024


def prepare(workdir: Path, s: TextSettings) -> dict[str, Any]:
    """Save the model, the tokenizer, the pairs and the settings the sides read."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=text_real.VOCAB, **(TINY if s.tiny else FULL), max_position_embeddings=s.max_length + 8,
                         rope_theta=500000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    # built on the GPU: random init of 1.5 B fp32 weights on the CPU takes longer than the side's steps
    device = "cuda" if not s.tiny and torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(s.seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(workdir / "model")
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the sides run in their own processes: leave them the memory
    text_real.word_tokenizer().save_pretrained(workdir / "model")
    pairs = tiny_mix(s) if s.tiny else text_real.length_mix(s)
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (workdir / "settings.json").write_text(json.dumps(asdict(s)))
    n = np.array([len(p["prompt"].split()) + len(p[k].split()) + 1 for p in pairs for k in ("chosen", "rejected")])
    return {"sequence_tokens_median": float(np.median(n)), "sequence_tokens_p90": float(np.percentile(n, 90)),
            "sequence_tokens_max": int(n.max()), "parameters": parameters}


def tiny_mix(s: TextSettings) -> list[dict[str, str]]:
    """--tiny: short pairs (prompts 6-15 words, answers 2-9) over the whole vocabulary, uneven lengths."""
    import numpy as np

    rng = np.random.default_rng(s.seed)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(4, text_real.VOCAB, n))  # noqa: E731
    return [{"prompt": words(int(rng.integers(6, 16))), "chosen": words(int(rng.integers(2, 10))),
             "rejected": words(int(rng.integers(2, 10)))} for _ in range(s.num_pairs)]


def load_settings(workdir: Path) -> TextSettings:
    data = json.loads((workdir / "settings.json").read_text())
    return TextSettings(**{f.name: data[f.name] for f in fields(TextSettings)})


def _cuda_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak(out: dict[str, Any]) -> dict[str, Any]:
    import torch

    out.setdefault("extra", {})
    if torch.cuda.is_available():
        out["extra"]["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_mmalign(workdir: Path, s: TextSettings, padding_free: bool = False) -> dict[str, Any]:
    import warnings

    from benchmarks.text_dpo import mmalign_steps

    _cuda_reset()
    with warnings.catch_warnings(record=True) as caught:  # a fast path that fell back says so here
        warnings.simplefilter("always")
        out = _cuda_peak(mmalign_steps(
            workdir, s, model={"lm_head_chunk": s.lm_head_chunk},
            data={"train": str(workdir / "pairs.jsonl"), "max_length": s.max_length, "padding_free": padding_free},
            train={"cpu": s.tiny, "mixed_precision": "no" if s.tiny else "bf16"}))
    out["extra"]["fallbacks"] = sorted({str(w.message) for w in caught
                                        if str(w.message).startswith(("data.padding_free", "model.lm_head_chunk"))})
    return out


def run_trl(workdir: Path, s: TextSettings, checkpointing: bool = False) -> dict[str, Any]:
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.text_dpo import mmalign_order, read_pairs, train_trl

    _cuda_reset()
    tic = time.perf_counter()
    pairs = read_pairs(workdir)
    ordered = Dataset.from_list([pairs[i] for i in mmalign_order(s)])
    path = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    device = {} if s.tiny else {"use_cpu": False, "bf16": True}
    return _cuda_peak(train_trl(workdir, s, policy, reference, tokenizer, ordered, tic,
                                gradient_checkpointing=checkpointing, **device))


SIDES = {
    "mmalign": run_mmalign,
    "mmalign_packed": lambda w, s: run_mmalign(w, s, padding_free=True),
    "trl": run_trl,
    "trl_gc": lambda w, s: run_trl(w, s, checkpointing=True),
}


def text_row(work: Path, tiny: bool, steps: int, sides: tuple[str, ...] = SIDES_ORDER) -> dict[str, Any]:
    """Prepare once, run each side in its own interpreter; ratios against `trl`."""
    from benchmarks.__main__ import run_side

    s = TextSettings(tiny=tiny, steps=steps, warmup=1, num_pairs=4 * steps if tiny else 64)
    folder = work / "text"
    folder.mkdir(parents=True, exist_ok=True)
    stats = prepare(folder, s)
    runs: dict[str, dict[str, Any]] = {}
    for side in sides:  # a side that fails is that side's result; the others still run
        print(f"[gpu]   text {side} ...", flush=True)
        try:
            runs[side] = run_side(side, folder, s.threads, side, "benchmarks.gpu_text")
        except RuntimeError as e:
            runs[side] = {"error": str(e)[-1500:]}
    done = {k: r for k, r in runs.items() if "error" not in r}
    for run in done.values():
        run["peak_mib"] = run.get("cuda_peak_mib", run["rss_growth_mib"])
    base = done.get("trl")
    row: dict[str, Any] = {"name": "text_128k", "sides": runs, "length_mix": stats,
                           "what": (f"text DPO, Llama-3.2-1B-shaped{' (tiny)' if tiny else ''}, vocabulary "
                                    f"{text_real.VOCAB:,} untied head, batch {s.batch_size} pairs, "
                                    f"{'fp32 CPU' if tiny else 'bf16 autocast'}, reference frozen copy"),
                           "differs": "mmalign: chunked LM head (+ padding_free); TRL: its fused LM head defaults"}
    if base:
        row["speedup"] = {k: r["pairs_per_s"] / base["pairs_per_s"] for k, r in done.items()}
        row["memory_ratio"] = {k: r["peak_mib"] / base["peak_mib"] for k, r in done.items()}
        row["max_loss_diff_first3"] = {k: max(abs(a - b) for a, b in zip(r["losses"][:3], base["losses"][:3]))
                                       for k, r in done.items()}
    return row


def table_lines(row: dict[str, Any]) -> list[str]:
    """The text row's lines of the GPU table: rate, peak memory and ratios to TRL per side."""
    lines = [f"  {'side':26}{'pairs/s':>9}{'peak MiB':>10}{'vs TRL rate':>13}{'vs TRL mem':>12}{'|Δloss| 1-3':>13}"]
    for name, r in row["sides"].items():
        if "error" in r:
            lines.append(f"  {name:26}FAILED: {r['error'].strip().splitlines()[-1][:200]}")
            continue
        ratios = (f"{row['speedup'][name]:>13.2f}{row['memory_ratio'][name]:>12.2f}"
                  f"{row['max_loss_diff_first3'][name]:>13.1e}" if "speedup" in row else "")
        fallback = f"  fell back: {'; '.join(r['fallbacks'])[:120]}" if r.get("fallbacks") else ""
        lines.append(f"  {name:26}{r['pairs_per_s']:>9.3g}{r['peak_mib']:>10.0f}{ratios}{fallback}")
    m = row["length_mix"]
    lines.append(f"  sequence tokens: median {m['sequence_tokens_median']:.0f}, p90 {m['sequence_tokens_p90']:.0f}, "
                 f"max {m['sequence_tokens_max']}; {m['parameters'] / 1e9:.2f} B parameters; differs: {row['differs']}")
    return lines


def _imports() -> None:
    text_real._imports()


if __name__ == "__main__":
    measure.run_side(__doc__, SIDES, load_settings, _imports, sys.argv[1:])
