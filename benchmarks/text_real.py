"""Text DPO at a real vocabulary and a real length mix: mmalign vs TRL's DPOTrainer (issue 20).

The model is Llama-3-shaped where it matters for memory: a 128,256-entry vocabulary with an
untied output head (Llama 3 8B's), at small depth and width so it fits this CPU (hidden 256,
2 layers, 4 heads). The tokenizer is word-level over 128,256 synthetic words, so token counts
are exactly word counts and no tokenizer merges differ between the two sides.

Length mix (per pair, drawn with numpy seed `seed`): prompt words ~ round(LogNormal(μ=log 96,
σ=0.8)) clipped to [8, min(512, max_length // 2)]; each answer independently ~ round(LogNormal(μ=log 128, σ=0.9))
clipped to [4, 1023 − prompt]; words Zipf(1.1)-distributed over the vocabulary. So sequences
are long-tailed up to 1,024 tokens (the EOS included) and chosen/rejected lengths differ, as in
real preference data. Completions start with a space: TRL 1.16 tokenises prompt + completion as
one string for text data (a boundary without a space merges two words), mmalign tokenises them
apart; with the space both give the same ids (checked: identical ids and per-sequence log-probs on
the first batch). Nothing is truncated on either side (mmalign `data.max_length` 1024, TRL
`max_length` None): both score every token.

Sides (each in a fresh interpreter, as `python -m benchmarks`): `mmalign` (its defaults: the
chunked LM head, `model.lm_head_chunk` 256), `mmalign_packed` (plus `data.padding_free`),
`mmalign_full_logits` (`model.lm_head_chunk: 0`, the path before issue 20), `mmalign_grouped`
(`data.group_by_length` K = `--group-by-length`, only when named: its order differs from TRL's), `trl` (DPOTrainer with every
default that differs from mmalign's matched: fp32, torch AdamW, constant lr, no gradient
checkpointing, sequential order) and `trl_gc` (TRL with its best memory options on this setup:
gradient checkpointing and precomputed reference log-probs, no reference model kept: `run_trl`).
Rates are pairs/s after the warm-up steps; memory is the
peak RSS growth of the process over its baseline after imports.

    python -m benchmarks.text_real                     # all sides, prints the table, writes JSON
    python -m benchmarks.text_real --steps 16 --warmup 2 --sides mmalign mmalign_grouped  # one epoch, grouped
    python -m benchmarks.text_real --padding-sweep 1 2 4 8 16   # padded tokens per K, no training
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from benchmarks import measure

VOCAB = 128_256
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


@dataclass
class Settings:
    steps: int = 12
    warmup: int = 2
    batch_size: int = 4  # pairs per step (8 sequences per forward)
    hidden_size: int = 256
    num_layers: int = 2
    num_pairs: int = 64
    lr: float = 1e-5
    beta: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 1024
    seed: int = 0
    threads: int = 2
    vocab: int = VOCAB
    group_by_length: int = 8  # the mmalign_grouped side's data.group_by_length


def word_tokenizer(vocab_size: int = VOCAB) -> Any:
    """Word-level tokenizer over SPECIALS + w4..w{vocab_size-1} (one id per word, no merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="right", model_max_length=4096)


def length_mix(s: Settings) -> list[dict[str, str]]:
    """`num_pairs` pairs drawn as the module docstring says."""
    import numpy as np

    rng = np.random.default_rng(s.seed)

    def words(n: int) -> str:
        ids = np.minimum(rng.zipf(1.1, n) + len(SPECIALS) - 1, s.vocab - 1)
        return " ".join(f"w{i}" for i in ids)

    pairs = []
    for _ in range(s.num_pairs):
        p = int(np.clip(round(rng.lognormal(np.log(96), 0.8)), 8, min(512, s.max_length // 2)))
        c, r = (int(np.clip(round(rng.lognormal(np.log(128), 0.9)), 4, s.max_length - 1 - p)) for _ in range(2))
        # completions start with a space: TRL 1.16 tokenises prompt + completion as ONE string for
        # text data, so without it the prompt's last word and the answer's first would merge into one
        # (unknown) word there, while mmalign tokenises them apart (the 4e-2 first-loss gap seen before)
        pairs.append({"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)})
    return pairs


def prepare(workdir: Path, s: Settings) -> dict[str, Any]:
    """Save the model, tokenizer and pairs both sides read; returns the length statistics."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(s.vocab)
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden_size, intermediate_size=4 * s.hidden_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=s.max_length + 8, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        LlamaForCausalLM(config).save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    pairs = length_mix(s)
    with open(workdir / "pairs.jsonl", "w") as f:
        for record in pairs:
            f.write(json.dumps(record) + "\n")
    (workdir / "settings.json").write_text(json.dumps(asdict(s)))
    lengths = np.array([len(p["prompt"].split()) + len(p[k].split()) + 1 for p in pairs for k in ("chosen", "rejected")])
    return {"sequence_tokens_median": float(np.median(lengths)), "sequence_tokens_p90": float(np.percentile(lengths, 90)),
            "sequence_tokens_max": int(lengths.max()), "sequence_tokens_min": int(lengths.min())}


def load_settings(workdir: Path) -> Settings:
    data = json.loads((workdir / "settings.json").read_text())
    return Settings(**{f.name: data[f.name] for f in fields(Settings)})


def run_mmalign(workdir: Path, s: Settings, padding_free: bool = False, chunk: int | None = None,
                group: int = 0) -> dict[str, Any]:
    """mmalign's trainer; `chunk` None: mmalign's default `model.lm_head_chunk`; `group`: its
    `data.group_by_length`. Also reports the padded fraction of the batches it read."""
    from benchmarks.text_dpo import mmalign_steps

    model = {"path": str(workdir / "model"), "dtype": "float32", **({} if chunk is None else {"lm_head_chunk": chunk})}
    return mmalign_steps(workdir, s, padding=True, model=model,
                         data={"train": str(workdir / "pairs.jsonl"), "max_length": s.max_length,
                               "padding_free": padding_free, "group_by_length": group})


def run_trl(workdir: Path, s: Settings, memory_options: bool = False) -> dict[str, Any]:
    """TRL's DPOTrainer; `memory_options`: the memory savers TRL 1.16 offers on this setup on top of
    its fused LM head (on by default): gradient checkpointing, and the reference log-probs
    precomputed before training (`precompute_ref_log_probs`, no reference model kept; the
    precompute pass is in setup_s, not in the rate). Its padding-free path is disabled in 1.16,
    Liger kernels need Triton (a GPU), and activation offloading moves activations to the CPU,
    where they already are."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.text_dpo import mmalign_order, read_pairs, train_trl

    tic = time.perf_counter()
    pairs = read_pairs(workdir)
    ordered = Dataset.from_list([pairs[i] for i in mmalign_order(s)])
    path = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if memory_options:
        return train_trl(workdir, s, policy, None, tokenizer, ordered, tic, gradient_checkpointing=True,
                         precompute_ref_log_probs=True)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return train_trl(workdir, s, policy, reference, tokenizer, ordered, tic)


SIDES = {
    "mmalign": run_mmalign,
    "mmalign_packed": lambda w, s: run_mmalign(w, s, padding_free=True),
    "mmalign_full_logits": lambda w, s: run_mmalign(w, s, chunk=0),
    # data.group_by_length (not in make bench): another order, so its losses are not TRL's
    "mmalign_grouped": lambda w, s: run_mmalign(w, s, group=s.group_by_length),
    "trl": run_trl,
    "trl_gc": lambda w, s: run_trl(w, s, memory_options=True),
}


def _imports() -> None:
    import datasets  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    import mmalign.modalities.causal_lm  # noqa: F401
    import mmalign.train.trainer  # noqa: F401


def padding_sweep(workdir: Path, s: Settings, windows: list[int]) -> str:
    """Padded tokens over one epoch of the prepared pairs in `batch_size`-pair batches: ungrouped,
    each pair alone (the floor: chosen vs rejected), and `data.group_by_length` K for K in `windows`
    (no training: the samplers' batches through `collate`)."""
    from transformers import AutoTokenizer

    from mmalign.data.length_grouping import LengthGroupedSampler, record_lengths
    from mmalign.data.preference import StreamSampler
    from mmalign.modalities.causal_lm import CausalLMLikelihood

    lik = CausalLMLikelihood(AutoTokenizer.from_pretrained(workdir / "model"), max_length=s.max_length)
    records = [json.loads(line) for line in open(workdir / "pairs.jsonl")]
    steps, b = -(-s.num_pairs // s.batch_size), s.batch_size
    samplers = {"ungrouped": StreamSampler(s.num_pairs, s.seed)}
    lengths = record_lengths(lik, records, "pair")
    samplers |= {f"K={k}": LengthGroupedSampler(lengths, s.seed, k) for k in windows}
    rows = {name: [x.micro_batch(m, b, 0, 1) for m in range(steps)] for name, x in samplers.items()}
    rows["each pair alone"] = [[i] for i in range(s.num_pairs)]
    lines = [f"one epoch: {s.num_pairs} pairs, batch {b} pairs; tokens the padded batches compute",
             f"{'order':<16}{'padded':>9}{'real':>9}{'computed':>10}{'pad %':>7}"]
    for name, batches in rows.items():
        masks = [lik.collate([records[i] for i in rs], "pair").inputs["attention_mask"] for rs in batches]
        pad, real = sum(int((m == 0).sum()) for m in masks), sum(int(m.sum()) for m in masks)
        lines.append(f"{name:<16}{pad:>9}{real:>9}{pad + real:>10}{100 * pad / (pad + real):>7.1f}")
    return "\n".join(lines)


def orchestrate(argv: list[str] | None = None) -> int:
    """Prepare once, run every side in its own process, print the table, write the JSON."""
    from benchmarks.__main__ import run_side

    p = argparse.ArgumentParser(prog="python -m benchmarks.text_real", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--warmup", type=int, default=Settings.warmup, help="first steps left out of the rate")
    p.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (default Llama 3's %(default)s)")
    p.add_argument("--sides", nargs="+", choices=sorted(SIDES), default=[k for k in SIDES if k != "mmalign_grouped"])
    p.add_argument("--group-by-length", type=int, default=Settings.group_by_length,
                   help="data.group_by_length K of the mmalign_grouped side (windows of K x batch pairs)")
    p.add_argument("--loss-tol", type=float, default=1e-4)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "text_real.json")
    p.add_argument("--padding-sweep", type=int, nargs="+", metavar="K",
                   help="only print the padded tokens of one epoch for these data.group_by_length values")
    a = p.parse_args(argv)
    s = Settings(steps=a.steps, warmup=a.warmup, vocab=a.vocab, group_by_length=a.group_by_length)
    if a.padding_sweep:
        with tempfile.TemporaryDirectory(prefix="mmalign_bench_real_") as tmp:
            prepare(Path(tmp), s)
            print(padding_sweep(Path(tmp), s, a.padding_sweep))
        return 0
    if not 0 <= s.warmup < s.steps:
        p.error("need 0 <= --warmup < --steps")
    runs, tol = {}, a.loss_tol
    with tempfile.TemporaryDirectory(prefix="mmalign_bench_real_") as tmp:
        stats = prepare(Path(tmp), s)
        print(f"[bench] length mix: {stats}", flush=True)
        for side in a.sides:
            print(f"[bench] {side} ...", flush=True)
            runs[side] = run_side(side, Path(tmp), s.threads, side, "benchmarks.text_real")
            print(f"[bench]   {runs[side]['pairs_per_s']:.3f} pairs/s, peak RSS +{runs[side]['rss_growth_mib']:.0f} MiB",
                  flush=True)
    base = runs.get("trl")
    lines = [f"text DPO at vocabulary {s.vocab:,}, Llama-shaped (hidden {s.hidden_size}, {s.num_layers} layers, untied "
             f"head), batch {s.batch_size} pairs, {s.steps} steps ({s.warmup} warm-up), fp32, {s.threads} threads; "
             f"sequence tokens median {stats['sequence_tokens_median']:.0f}, p90 {stats['sequence_tokens_p90']:.0f}, "
             f"max {stats['sequence_tokens_max']}",
             f"{'side':<16}{'pairs/s':>10}{'peak RSS +MiB':>15}{'vs TRL rate':>13}{'vs TRL mem':>12}{'max |Δloss| 10':>16}"
             f"{'CPU s':>8}{'steps s':>9}{'pad %':>7}"]
    ok = True
    for side, run in runs.items():
        rate, mem = run["pairs_per_s"], run["rss_growth_mib"]
        same_order = base is not None and side != "mmalign_grouped"  # grouped: other pairs at each step
        diff = max(abs(x - y) for x, y in zip(run["losses"][:10], base["losses"][:10])) if same_order else float("nan")
        ok = ok and (diff <= tol or not same_order)
        ratios = (f"{rate / base['pairs_per_s']:>13.2f}{mem / base['rss_growth_mib']:>12.2f}" if base else " " * 25)
        pad = f"{100 * run['padded_fraction']:>7.1f}" if "padded_fraction" in run else f"{'':>7}"
        lines.append(f"{side:<16}{rate:>10.3f}{mem:>15.0f}{ratios}{diff:>16.1e}{run['process_cpu_s']:>8.0f}"
                     f"{sum(run['step_ms']) / 1000:>9.1f}{pad}")
    lines.append("CPU s: CPU seconds of the side's whole process (imports, setup, steps); / threads ~ its wall time "
                 "on idle cores. steps s: wall time of all steps (warm-up included). pad %: padded tokens of the "
                 "padded batches read (a padding-free side computes none of them)")
    table = "\n".join(lines)
    print("\n" + table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "text_real", "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.text_real " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "settings": asdict(s),
        "length_mix": stats, "table": table, "runs": runs}, indent=1))
    print(f"\n[bench] wrote {a.out}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--side" in argv:
        measure.run_side(__doc__, SIDES, load_settings, _imports, argv)
    else:
        sys.exit(orchestrate(argv))


if __name__ == "__main__":
    main()
