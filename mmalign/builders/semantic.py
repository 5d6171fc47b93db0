"""`mmalign build-pairs semantic-weights`: Sem-DPO's per-example weights (Mohamed et al. 2025,
arXiv 2507.20133; shared/METHODS.md B.5) added to an existing pair file.

    W_alpha(x, y_w) = exp(-alpha d_cos(e(x), e(y_w))),   d_cos = 1 - cos,

x = the original prompt (the record's `--original-key`, default "prompt"), y_w = the chosen text
(`--chosen-key`, default "chosen": in Sem-DPO the winning REWRITTEN prompt), e = a frozen
sentence-embedding model read from a local folder (a sentence-transformers folder or any
transformers encoder folder: `AutoModel` + `AutoTokenizer`, safetensors weights), pooled as the
attention-masked MEAN of its last hidden states (sentence-transformers' default pooling; a
folder whose own pooling is CLS gets mean pooling here). W is computed once, offline, with no
gradient, and written as the record's "weight" column, which the trainer already multiplies into
each example's loss (`PreferenceBatch.weights`): Sem-DPO is then `loss.name: dpo` on this file.
A record that already has a "weight" keeps it as a factor: weight <- weight * W.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mmalign.errors import DataError

__all__ = ["build_semantic_weights", "embed_texts", "load_embedder", "semantic_weights"]


def load_embedder(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of the local encoder folder `path`, in eval mode, float32."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise DataError(f"build-pairs semantic-weights: {folder} is not a model folder (no config.json); "
                        "give a local sentence-embedding model folder (no downloads here)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True, torch_dtype=torch.float32)
    return model.eval(), tokenizer


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                max_length: int = 256) -> Tensor:
    """Mean-pooled embeddings (N, H): e = sum_t m_t h_t / sum_t m_t over the last hidden states h."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).float()


def semantic_weights(original: Tensor, chosen: Tensor, alpha: float) -> Tensor:
    """W = exp(-alpha (1 - cos(original_i, chosen_i))), (N,) from two (N, H) embeddings."""
    cos = torch.nn.functional.cosine_similarity(original.double(), chosen.double(), dim=-1)
    return torch.exp(-alpha * (1 - cos))


def _text(value: Any, key: str, row: int) -> str:
    """A record's text: a string, or the joined contents of a chat message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return " ".join(m["content"] for m in value)
    raise DataError(f"build-pairs semantic-weights: row {row} key '{key}' is not text "
                    "(a string or a list of chat messages); Sem-DPO weighs text (rewritten prompts)")


def build_semantic_weights(records: list[dict[str, Any]], model: Any, tokenizer: Any, *, alpha: float,
                           original_key: str = "prompt", chosen_key: str = "chosen",
                           batch_size: int = 32) -> list[dict[str, Any]]:
    """The records with "weight" = (existing weight, default 1) * W_alpha(original, chosen)."""
    if not math.isfinite(alpha) or alpha < 0:
        raise DataError(f"build-pairs semantic-weights: --alpha must be finite and >= 0, got {alpha}")
    for i, r in enumerate(records):
        for key in (original_key, chosen_key):
            if key not in r:
                raise DataError(f"build-pairs semantic-weights: row {i} has no '{key}'")
    originals = [_text(r[original_key], original_key, i) for i, r in enumerate(records)]
    chosen = [_text(r[chosen_key], chosen_key, i) for i, r in enumerate(records)]
    w = semantic_weights(embed_texts(model, tokenizer, originals, batch_size),
                         embed_texts(model, tokenizer, chosen, batch_size), alpha)
    return [dict(r, weight=float(r.get("weight", 1.0)) * float(wi)) for r, wi in zip(records, w)]


def run(args: argparse.Namespace) -> int:
    from mmalign.data.preference import read_records
    from mmalign.io import write_jsonl_atomic

    records = read_records(args.pairs)
    if not records:
        raise DataError(f"build-pairs semantic-weights: {args.pairs} has no records")
    model, tokenizer = load_embedder(args.embedder)
    rows = build_semantic_weights(records, model, tokenizer, alpha=args.alpha, original_key=args.original_key,
                                  chosen_key=args.chosen_key, batch_size=args.batch_size)
    write_jsonl_atomic(args.out, rows)
    w = [r["weight"] for r in rows]
    print(f"[mmalign] build-pairs semantic-weights: {len(rows)} records, weight min {min(w):.4f} "
          f"mean {sum(w) / len(w):.4f} max {max(w):.4f}; wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("semantic-weights", help="Sem-DPO: add weight = exp(-alpha (1 - cos)) of original vs "
                       "chosen prompt embeddings", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="input pair file (jsonl / json / parquet)")
    p.add_argument("--out", required=True, help="output pairs jsonl with the weight column")
    p.add_argument("--embedder", required=True, help="local sentence-embedding model folder")
    p.add_argument("--alpha", type=float, required=True, help="Sem-DPO's alpha (W = exp(-alpha d_cos))")
    p.add_argument("--original-key", default="prompt", help="the record key holding the original prompt")
    p.add_argument("--chosen-key", default="chosen", help="the record key holding the chosen text")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run)
